"""The stride-16 trunks by name: :data:`TRUNK_BUILDERS` and :func:`build_trunk`.

Each builder returns a :class:`~deepmask_cli.modeling.trunk_base.Trunk`,
written in the project, with its ImageNet state dict mapped on:

- ``efficientnet-lite0``, ``-lite1``, ``-lite2``: EfficientNet-Lite up to its
  stride-16 stage (:mod:`deepmask_cli.modeling.efficientnet_lite`).
- ``vgg-a``: the paper's trunk, VGG-A without the last max-pool; ``resnet50``:
  the official code's later choice, ResNet-50 up to ``layer3``
  (:mod:`deepmask_cli.modeling.torchvision_trunks`).
"""

from __future__ import annotations

from typing import Callable

from deepmask_cli.modeling.efficientnet_lite import EfficientNetLite0Trunk, EfficientNetLite1Trunk, EfficientNetLite2Trunk
from deepmask_cli.modeling.torchvision_trunks import ResNet50Trunk, VGGATrunk
from deepmask_cli.modeling.trunk_base import Trunk

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
