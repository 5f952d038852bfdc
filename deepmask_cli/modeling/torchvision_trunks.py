"""The trunks whose ImageNet weights are torchvision's: VGG-A and ResNet-50.

- ``vgg-a``: the paper's trunk, VGG-A (torchvision's vgg11) convolutions without
  the last max-pool: 512 channels.
- ``resnet50``: the official code's later choice, ResNet-50 up to ``layer3``:
  1024 channels.

Their ImageNet weights come from torchvision's download, or a file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from deepmask_cli.modeling.trunk_base import PretrainedWeightsError, Trunk


def _load_torchvision(path: str | Path | None, url: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict of trunk ``name``'s torchvision ImageNet weights: from
    ``path`` when given, else downloaded from ``url`` (or torch hub's cache);
    :class:`PretrainedWeightsError` saying where to put the file when the
    download fails."""
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


# --------------------------------------------------------------------------- VGG-A
_VGG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)  # last "M" dropped
_VGG11_URL = "https://download.pytorch.org/models/vgg11-8a719046.pth"


class VGGATrunk(Trunk):
    """VGG-A (torchvision's vgg11) convolutions without the last max-pool."""

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
    """ResNet-50 up to ``layer3``, its batch norms frozen."""

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
