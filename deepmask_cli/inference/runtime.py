"""Where and in what arithmetic the network runs: the device, the precision,
the trunk's runtime (torch or ONNX Runtime, float32 or the weights' int8
network), and the CPU features that decide them."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings

import torch

from deepmask_cli.core.config import TRUNK_STRIDE
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.modeling.model import DeepMask


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX);
    elsewhere bf16 is emulated and slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp16`` on a GPU, ``bf16`` on a CPU with native bf16, else
    ``fp32``; any other precision is returned as is. (On a GPU fp16 has 3
    more mantissa bits than bf16 and runs as fast: docs/benchmarks.md.)"""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def int8_dot_cpu() -> bool:
    """Whether this CPU has x86 int8 dot-product instructions (AVX512-VNNI or
    AVX-VNNI), with which ONNX Runtime's int8 convolutions are exact with
    8-bit weights too. Read from ``/proc/cpuinfo``: elsewhere the answer is
    no."""
    return cpuinfo_has_int8_dot(_cpuinfo())


@functools.lru_cache(maxsize=1)
def int8_cpu() -> bool:
    """Whether this is an x86-64 CPU on which the int8 network has been
    measured to be fast and exact: AVX2 at least (with or without VNNI,
    thanks to its 7-bit weights). Elsewhere (other architectures, where it
    has not been measured, or other systems) the answer is no."""
    return "avx2" in cpu_flags(_cpuinfo())


def cpuinfo_has_int8_dot(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a ``/proc/cpuinfo`` text names
    AVX512-VNNI or AVX-VNNI."""
    return bool(cpu_flags(cpuinfo) & {"avx512_vnni", "avx_vnni"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first ``flags`` line of a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: The instruction sets that decide which network is fast on an x86 CPU.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def describe_cpu(cpuinfo: str | None = None) -> str:
    """The CPU model and which of :data:`CPU_FEATURES` it has, in one line,
    for every speed figure (read from ``/proc/cpuinfo`` unless given)."""
    import platform

    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = cpu_flags(cpuinfo)
    has = [f for f in CPU_FEATURES if f in flags]
    lacks = [f for f in CPU_FEATURES if f not in flags]
    return f"{model}; has: {' '.join(has) or 'none'}; lacks: {' '.join(lacks) or 'none'}"


def resolve_runtime(runtime: str, device: torch.device, int8_trunk: str | os.PathLike | None, precision: str) -> str:
    """``auto`` -> ``onnx-int8`` on an x86-64 CPU with AVX2 (:func:`int8_cpu`)
    when ``int8_trunk`` exists, ONNX Runtime is installed and ``precision``
    is not ``fp32``; else ``torch``. Any other runtime is returned as is."""
    if runtime != "auto":
        return runtime
    if device.type != "cpu" or precision == "fp32" or int8_trunk is None or not os.path.isfile(int8_trunk):
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None or not int8_cpu():
        return "torch"
    return "onnx-int8"


class _TrunkOutputs(torch.nn.Module):
    """The trunk, then the dense score head if any: ``canvas -> (fmap[,
    scores], *finer maps)``."""

    def __init__(self, trunk: torch.nn.Module, score_head: torch.nn.Module | None, finer: tuple[int, ...]):
        super().__init__()
        self.trunk, self.score_head, self.finer = trunk, score_head, finer

    def forward(self, canvas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.trunk.levels(canvas) if self.finer else {TRUNK_STRIDE: self.trunk(canvas)}
        fmap = maps[TRUNK_STRIDE]
        scores = [] if self.score_head is None else [self.score_head.dense(fmap)]
        return (fmap, *scores, *(maps[s] for s in self.finer))


def export_trunk_onnx(trunk: torch.nn.Module, out, score_head: torch.nn.Module | None = None,
                      finer: tuple[int, ...] = ()) -> None:
    """Write ``trunk`` (float32) as ONNX to ``out`` (a path or a binary file),
    for any batch, height and width: input ``canvas``, output ``fmap``; with
    ``score_head`` (a :class:`~deepmask_cli.modeling.model.ScoreHead`) also its
    dense ``scores``; and ``stride{s}``, the trunk's map at each stride of
    ``finer`` (those a SharpMask refinement reads: :func:`onnx_maps`)."""
    example = torch.zeros(1, 3, 224, 224)
    net = _TrunkOutputs(trunk, score_head, tuple(finer)).eval()
    # the outputs, in _TrunkOutputs' order, with their dynamic axes
    outputs = {"fmap": {0: "b", 2: "fh", 3: "fw"}}
    if score_head is not None:
        outputs["scores"] = {0: "b", 1: "sh", 2: "sw"}
    outputs.update({f"stride{s}": {0: "b", 2: f"h{s}", 3: f"w{s}"} for s in finer})
    names, axes = list(outputs), {"canvas": {0: "b", 2: "h", 3: "w"}, **outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), out, input_names=["canvas"], output_names=names, opset_version=17,
                          dynamic_axes=axes, dynamo=False)


def network_fingerprint(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' weights and statistics (as float32), so that an
    int8 network can tell whether it was made from them."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def onnx_session(trunk: torch.nn.Module, device: torch.device, runtime: str, int8_trunk: str | None,
                source: DeepMask):
    """An ONNX Runtime session running the trunk: ``trunk`` exported here
    (runtime ``onnx``), or the int8 trunk and score head of ``deepmask
    quantize`` (``onnx-int8``), which must have been made from ``source``'s
    weights (the unfolded trunk's and the score head's)."""
    if device.type != "cpu":
        raise ConfigError(f"runtime {runtime} runs the trunk on the CPU; use runtime torch with a GPU")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"runtime {runtime} needs ONNX Runtime: pip install onnxruntime") from None
    if runtime == "onnx-int8":
        if int8_trunk is None or not os.path.isfile(int8_trunk):
            where = int8_trunk or "the weights folder"
            raise ConfigError(f"runtime onnx-int8 needs an int8 trunk ({where}: not found); "
                             "make one with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
        model = os.fspath(int8_trunk)
    else:
        import io

        if importlib.util.find_spec("onnx") is None:
            raise ConfigError(f"runtime {runtime} exports the trunk, which needs onnx: pip install 'deepmask[onnx]'")

        buf = io.BytesIO()
        export_trunk_onnx(trunk, buf, finer=refine_strides(source))
        model = buf.getvalue()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # no spinning between runs: the heads run in torch right after, on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if runtime != "onnx-int8":
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{int8_trunk}: not a readable ONNX model ({first}); make it again with deepmask quantize") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("network_sha256") != network_fingerprint(source.trunk, source.score_head):
        raise ConfigError(f"{int8_trunk}: made from other weights than these (or by another version of deepmask quantize); "
                         "make it again with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
    if meta.get("weight_bits") != "7" and not int8_dot_cpu():
        raise ConfigError(f"{int8_trunk}: its 8-bit weights saturate on a CPU without VNNI (wrong maps); "
                         "make it again (7-bit) with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
    return session


def refine_strides(model: DeepMask) -> tuple[int, ...]:
    """The strides, below the trunk's, of the maps ``model``'s refinement reads
    (none without one): the ONNX trunks return them too."""
    return model.refine_head.finer if model.refine_head is not None else ()


def onnx_maps(session, canvas: torch.Tensor, strides: tuple[int, ...] | list[int], dtype: torch.dtype
              ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """An ONNX trunk (:func:`onnx_session`) on ``canvas``: ``({stride: map},
    dense score logits)``, the maps channels-last in ``dtype``: the stride-16
    map, and the maps at ``strides`` that the session returns (those of an
    int8 trunk made before its weights had a refinement are computed in
    torch instead); the scores are None unless the session holds the score
    head (``onnx-int8``)."""
    names = [o.name for o in session.get_outputs()]
    want = [n for n in names if n in ("fmap", "scores") or n in {f"stride{s}" for s in strides}]
    out = dict(zip(want, session.run(want, {"canvas": canvas.numpy()})))
    scores = torch.from_numpy(out.pop("scores")) if "scores" in out else None
    maps = {TRUNK_STRIDE if n == "fmap" else int(n[len("stride"):]):
            torch.from_numpy(a).to(dtype).contiguous(memory_format=torch.channels_last) for n, a in out.items()}
    return maps, scores
