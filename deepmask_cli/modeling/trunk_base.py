"""What every stride-16 trunk is, and what works on any of them.

A :class:`Trunk` is an ``nn.Module`` from a ``(B, 3, H, W)`` image normalised
with the trunk's own ``mean``/``std`` to a ``(B, C, H/16, W/16)`` map. Batch
norm is frozen (the statistics and affine terms of ImageNet, as the official
DeepMask code does), so small patch batches do not disturb it. The trunks
themselves are in :mod:`deepmask_cli.modeling.torchvision_trunks` and
:mod:`deepmask_cli.modeling.efficientnet_lite`, named in
:mod:`deepmask_cli.modeling.trunks`.
"""

from __future__ import annotations

import copy
from pathlib import Path

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

    def levels(self, x: torch.Tensor, last: int = 16) -> dict[int, torch.Tensor]:
        """``{stride: (B, C_s, H/stride, W/stride)}`` for strides 2 to ``last``:
        the last map the trunk computes at each; ``levels(x)[16]`` is
        ``self(x)``. A smaller ``last`` stops there (the finer maps alone,
        for a refinement that has the stride-16 map already)."""
        out: dict[int, torch.Tensor] = {}
        for stride, module in self._stages():
            if stride > last:
                break
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
        """Load the trunk's ImageNet weights: from ``path`` (a state dict
        file) when given, else from where the trunk's weights are published;
        :class:`PretrainedWeightsError` when they cannot be had."""
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
        out = copy.deepcopy(self).eval()
        for parent in list(out.modules()):
            children = list(parent.named_children())
            # a batch norm follows its convolution among the parent's children
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                    setattr(parent, a, fuse_conv_bn(conv, bn))
                    setattr(parent, b, nn.Identity())
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

