"""An int8 trunk and score head for CPUs: ``deepmask quantize``.

The trunk and the dense score head (the two parts that run over every
window of every pyramid level) are exported to ONNX as one network and
quantized statically with ONNX Runtime: int8 weights (per output channel)
and uint8 activations, whose ranges are calibrated on pyramid levels of real
photos (the whole range seen: for this ReLU6 network ONNX Runtime's entropy
calibration chose the same ranges, at several times the memory, because it
keeps every activation map until the end). The weights use 7 of their 8 bits
(``reduce_range``): x86 CPUs without int8 dot-product instructions (VNNI)
multiply uint8 activations by int8 weights in pairs summed into int16
(``vpmaddubsw``), which saturates when both are near full range (2 x 255 x
127 > 32767) and corrupts the maps; with 7-bit weights (2 x 255 x 63) it
cannot, so one file is exact on every x86-64 CPU. The mask head, which runs on the kept windows
only, stays in torch. The result, ``trunk-int8.onnx`` in the weights folder,
is what ``--runtime onnx-int8`` (and ``auto`` on x86-64 CPUs) runs; its
metadata records how it was made. Its cost in recall for the shipped weights
is in their model card.

Calibration reads fixed-size crops of each photo's pyramid levels (so that
histograms of every activation can be pooled, for the histogram methods),
from photos spread evenly over the given list.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from deepmask_cli.core.config import CALIBRATION_METHODS, InferenceConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.files import atomic_write
from deepmask_cli.formats.images import ImageError, load_image
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.inference.pyramid import image_to_tensor, level_size, pyramid_canvas
from deepmask_cli.inference.runtime import export_trunk_onnx, network_fingerprint, refine_strides

#: Pyramid scales and the side of the square crops calibration reads.
CALIBRATION_SCALES = (0.5, 1.0, 2.0)
CALIBRATION_CROP = 448


def _bottleneck_nodes(graph_model) -> list[str]:
    """The score head's bottleneck convolutions (fc0 and the fc1 after it),
    found by their bias initialisers, to keep in float: the bottleneck's
    values are signed and few, and uint8 steps over them cost recall, while
    these two layers are a small part of the work."""
    return _float_nodes(graph_model, ("score_head.fc0.", "score_head.fc1."))


def _float_nodes(graph_model, prefixes: Sequence[str]) -> list[str]:
    """The convolutions whose bias is a parameter named with one of
    ``prefixes`` (the network's own names: ``trunk.blocks.10.``,
    ``score_head.``), to leave in float."""
    return [n.name for n in graph_model.graph.node
            if n.op_type == "Conv" and any(i.startswith(tuple(prefixes)) for i in n.input[1:])]


class QuantizeError(UserError):
    """A quantization the user can fix (missing extra, no readable photo)."""


def calibration_canvases(model: DeepMask, images: Sequence[torch.Tensor], *, scales: Sequence[float] = CALIBRATION_SCALES,
                         crop: int = CALIBRATION_CROP, max_side: int = InferenceConfig.max_side):
    """``(1, 3, crop, crop)`` float32 arrays: the top-left crop of each
    ``(3, H, W)`` photo's canvas at each scale, as the proposer builds
    canvases (resized, normalised, half a window of neutral fill),
    zero-padded when smaller."""
    for t in images:
        for s in scales:
            size = level_size(t.shape[1], t.shape[2], s, max_side)
            c = pyramid_canvas([t], [size], model.config.patch_size, model.normalize)
            c = F.pad(c, (0, max(0, crop - c.shape[3]), 0, max(0, crop - c.shape[2])))[:, :, :crop, :crop]
            yield c.contiguous().numpy()


def calibration_photos(images: Sequence[str | Path], limit: int, error: type[Exception] = ValueError
                       ) -> tuple[list[Path], list[torch.Tensor]]:
    """``limit`` photos spread evenly over ``images``, read as ``(3, H, W)``
    tensors: ``(their paths, the tensors)``. Unreadable photos are skipped;
    none at all, no photo or a bad ``limit`` raise ``error``."""
    images = [Path(p) for p in images]
    if not images:
        raise error("no calibration photos given")
    if limit <= 0:
        raise error(f"limit must be positive, got {limit}")
    chosen = images[:: max(1, len(images) // limit)][:limit]
    readable, photos = [], []
    for p in chosen:
        try:
            photos.append(image_to_tensor(load_image(p)))
        except ImageError:
            continue
        readable.append(p)
    if not readable:
        raise error(f"none of the {len(chosen)} calibration photos could be read (first: {chosen[0]})")
    return readable, photos


def quantize_trunk(model: DeepMask, images: Sequence[str | Path], out: str | Path, *, limit: int = 16,
                   keep_float: Sequence[str] = (), method: str = CALIBRATION_METHODS[0]) -> Path:
    """Write the int8 trunk and score head of ``model``, calibrated on ``limit`` photos
    spread evenly over ``images``, to ``out`` (atomically). ``keep_float``:
    parameter-name prefixes (``trunk.blocks.10.``, ``score_head.``) of
    convolutions to leave in float32. ``method``: one of
    :data:`CALIBRATION_METHODS`.

    Raises :class:`QuantizeError` when ONNX Runtime or ``onnx`` is missing or
    no photo can be read.
    """
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise QuantizeError("quantize needs ONNX Runtime and onnx: pip install 'deepmask[onnx]'") from None
    if method not in CALIBRATION_METHODS:
        raise QuantizeError(f"calibration method {method!r}: give one of {', '.join(CALIBRATION_METHODS)}")
    readable, photos = calibration_photos(images, limit, QuantizeError)

    model = model.cpu().eval()
    trunk = model.trunk.fused().to(memory_format=torch.channels_last)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calibration_canvases(model, photos)

        def get_next(self):
            c = next(self._it, None)
            return None if c is None else {"canvas": c}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        f32, pre, q = Path(tmp) / "trunk.onnx", Path(tmp) / "trunk-pre.onnx", Path(tmp) / "trunk-int8.onnx"
        export_trunk_onnx(trunk, f32, model.score_head, refine_strides(model))
        quant_pre_process(str(f32), str(pre))
        graph = onnx.load(str(pre))
        float_nodes = _bottleneck_nodes(graph) if model.score_head.fc0 is not None else []
        if keep_float:
            chosen = _float_nodes(graph, keep_float)
            if not chosen:
                raise QuantizeError(f"--keep-float {' '.join(keep_float)}: no convolution's parameters start with that "
                                    "(names look like trunk.blocks.10. or score_head.fc2.)")
            float_nodes = sorted(set(float_nodes) | set(chosen))
        calibrate_method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                            "minmax": CalibrationMethod.MinMax}[method]
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # ORT prints its progress
            quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate_method, reduce_range=True,
                            nodes_to_exclude=float_nodes)
        m = onnx.load(str(q))
        meta = {"deepmask_config": json.dumps(model.config.to_dict()), "network_sha256": network_fingerprint(model.trunk, model.score_head),
                "calibration": json.dumps({"images": [p.name for p in readable], "scales": list(CALIBRATION_SCALES),
                                           "crop": CALIBRATION_CROP, "method": method}),
                "weight_bits": "7", "float_layers": json.dumps(list(keep_float))}
        onnx.helper.set_model_props(m, meta)
        atomic_write(out, lambda f: f.write(m.SerializeToString()))
    return out
