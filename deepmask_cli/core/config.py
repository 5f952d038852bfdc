"""Every default of deepmask, in one place.

Three frozen dataclasses:

- :class:`ModelConfig`: the architecture. It travels with the weights
  (``config.json`` in a weights folder), so a model is always rebuilt exactly as
  it was trained.
- :class:`InferenceConfig`: full-scene proposal generation (pyramid, top-k,
  thresholds, NMS).
- :class:`TrainConfig`: optimisation and patch sampling for ``deepmask train``.

The command-line options default to "not given" and override these values;
they never restate a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from deepmask_cli.core.errors import ConfigError
from deepmask_cli.core.schema import Serialisable, check_range

#: The stride of every trunk's output map, in input pixels.
TRUNK_STRIDE = 16
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
#: How ``deepmask quantize`` chooses activation ranges from the calibration
#: maps (ONNX Runtime's calibrators), the default first: minmax (the whole
#: range seen), entropy (KL divergence of the histogram), percentile (the
#: 99.999th).
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

#: Trunk names a config may ask for; :data:`deepmask_cli.modeling.trunks.TRUNK_BUILDERS`
#: builds each (a test keeps the two the same). Named here so that the config
#: layer checks a name without importing the models.
TRUNKS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "vgg-a", "resnet50")

# Bounds on what a config.json or an option may ask for: far past any use,
# short of asking for more memory than a machine has.
MAX_PATCH = 1024
MAX_MASK_SIZE = 512
MAX_WIDTH = 16384
#: Most pyramid scales, and the octaves they may span (2**-8 .. 2**4).
MAX_SCALES = 64
SCALE_RANGE = (-8.0, 4.0)
MAX_SIDE = 16384
MAX_PROPOSALS = 1_000_000


@dataclass(frozen=True)
class ModelConfig(Serialisable):
    """The DeepMask architecture (Pinheiro et al., NIPS 2015).

    The network looks at a square ``patch_size`` input window. Its trunk maps it
    to a ``patch_size/16`` square feature window, shared by a mask head (a 1x1
    conv + ReLU, then two linear layers with nothing between them, giving a
    ``mask_size`` square of per-pixel logits that covers the whole window) and a
    score head (2x2 max-pool, two fully connected layers with ReLU, one
    objectness logit). A window is positive when an object is centred in it
    with its longer side ``object_size`` pixels.
    """

    trunk: str = "efficientnet-lite0"
    patch_size: int = 192
    object_size: int = 112
    mask_size: int = 56
    mask_channels: int = 128
    mask_hidden: int = 512
    score_hidden: tuple[int, int] = (512, 1024)
    # A linear projection of each window's pooled features to this many
    # values before the score head's first layer; 0: none (the paper's head).
    score_bottleneck: int = 0
    dropout: float = 0.5
    # SharpMask's refinement modules (ECCV 2016), the width of each, reading
    # the trunk's maps at strides 16, 8, 4, ...: each doubles the mask's
    # resolution. Empty: none (DeepMask's 56x56 masks).
    refine: tuple[int, ...] = ()
    # The refinement predicts a correction added to DeepMask's own mask
    # logits, upsampled (its last layer starts at zero, so training starts
    # from DeepMask's masks rather than from nothing); False: the paper's
    # form, the refined mask from the modules alone.
    refine_from_mask: bool = True

    def __post_init__(self) -> None:
        self.check_types()
        if self.trunk not in TRUNKS:
            raise ConfigError(f"unknown trunk {self.trunk!r}; choose one of {', '.join(TRUNKS)}")
        if self.patch_size <= 0 or self.patch_size % (2 * TRUNK_STRIDE):
            raise ConfigError(
                f"patch_size must be a positive multiple of {2 * TRUNK_STRIDE} "
                f"(the score head max-pools the stride-16 map by 2), got {self.patch_size}"
            )
        if not 0 < self.object_size <= self.patch_size:
            raise ConfigError(f"object_size must be in (0, patch_size], got {self.object_size}")
        if len(self.score_hidden) != 2:
            raise ConfigError("score_hidden takes exactly two widths")
        if self.score_bottleneck < 0:
            raise ConfigError(f"score_bottleneck must be >= 0 (0: none), got {self.score_bottleneck}")
        if any(k <= 0 for k in self.refine) or len(self.refine) > 4:
            raise ConfigError(f"refine takes 1 to 4 positive module widths, got {self.refine}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        check_range(self, "patch_size", hi=MAX_PATCH)
        check_range(self, "mask_size", 1, MAX_MASK_SIZE)
        for name in ("mask_channels", "mask_hidden"):
            check_range(self, name, 1, MAX_WIDTH)
        check_range(self, "score_bottleneck", hi=MAX_WIDTH)
        if any(not 0 < k <= MAX_WIDTH for k in (*self.score_hidden, *self.refine)):
            raise ConfigError(f"score_hidden and refine widths must be in 1..{MAX_WIDTH}")

    @property
    def feat_size(self) -> int:
        """Side of the trunk's feature window for one patch."""
        return self.patch_size // TRUNK_STRIDE



#: ``ModelConfig.refine`` of ``deepmask train --refine``: three modules,
#: reading the trunk's maps at strides 16, 8 and 4, for 96x96 masks over a
#: 192-pixel window. Narrow, as the paper's (32 to 8 channels here).
SHARPMASK_REFINE = (32, 16, 8)


@dataclass(frozen=True)
class InferenceConfig(Serialisable):
    """Full-scene proposal generation.

    The image is resized by every scale ``2**s`` for ``s`` in
    ``scale_min, scale_min + scale_step, ..., scale_max`` (octaves) and the
    network runs densely at each; a window at scale ``2**s`` proposes objects of
    about ``object_size / 2**s`` pixels in the original image.

    These defaults are neutral: the official code's pyramid and plain
    practice elsewhere, tuned for no weights in particular. A weights folder
    carries the values tuned for it in its ``config.json`` (``inference``),
    which :func:`deepmask_cli.modeling.weights.load_weights` puts on top of these, and
    what a caller or the command line gives goes on top of both.
    """

    scale_min: float = -2.5
    scale_max: float = 0.5
    scale_step: float = 0.5
    # Windows kept by score before masks are computed (only max_proposals of
    # them when NMS is off). With NMS these are the candidates it ranks, so
    # the first N proposals of a run with max_proposals N are the first N of
    # any longer run.
    pre_nms_topk: int = 1000
    max_proposals: int = 1000
    score_thresh: float = 0.0
    mask_thresh: float = 0.5
    # Multiply each score by its mask's maskness, the mean probability over
    # the pixels the mask keeps (SOLOv2's mask-quality rescoring), before NMS.
    maskness: bool = False
    nms: str = "box"
    nms_thresh: float = 0.7
    # What NMS does with a proposal it suppresses: demote it (True: its score
    # times 1 - its IoU with the better kept proposal that suppressed it; the
    # linear Soft-NMS decay, once) or drop it. Demoting reorders the same
    # pre_nms_topk best windows, so the top of the list is diverse and
    # nothing is lost further down.
    nms_demote: bool = False
    # Added to each window's objectness logit per octave of its pyramid
    # scale, before the windows are ranked: > 0 favours the finer scales
    # (smaller objects), < 0 the coarser. Training balances positives and
    # negatives per patch, not per object size, so the scales' scores need
    # not rank one another as a photo's objects are distributed. 0: none.
    scale_prior: float = 0.0
    # Run the network on each pyramid level and on its mirror image, and
    # average the two passes' score and mask logits window by window (test-
    # time flip; the mirror of a canvas puts every window's twin on the
    # stride-16 grid). Twice the network's work.
    flip: bool = False
    max_side: int = 2048
    # Weights with SharpMask's refinement (ModelConfig.refine): refine the
    # masks of each image's refine_topk best windows (the rest keep DeepMask's
    # masks; the scores are DeepMask's either way). The refinement reads each
    # window's crop of the dense pass's stride-16 map and of the trunk's
    # finer maps of the same canvas (run in torch once per pyramid level,
    # whatever runtime ran the dense pass). refine=False: DeepMask's masks only.
    refine: bool = True
    refine_topk: int = 100
    # Windows pasted together; 0: 1024 of one pyramid scale on a CPU, 4096
    # of neighbouring scales on a GPU.
    paste_chunk: int = 0
    # Canvases are squares whose side is the longest image side rounded up to
    # this many pixels, so a GPU sees few distinct shapes: each new shape
    # costs cuDNN planning at every pyramid level (docs/benchmarks.md, GPU).
    # 0: tight canvases; -1: on a GPU 128 with a side of at least 640 (COCO's
    # photos, 640 pixels or less, then share one shape), 0 on a CPU.
    shape_bucket: int = -1
    # Network arithmetic: fp32, or fp16/bf16 weights and activations (fp16 on
    # a GPU only).
    # auto: bf16 on a CPU with native bf16 instructions (AVX512-BF16 or AMX),
    # where it is faster at a recall cost within the 0.005 of mask AR@100 a
    # default may cost; fp16 on a GPU, where of the half precisions it
    # matches fp32's proposals best; fp32 elsewhere (docs/benchmarks.md).
    precision: str = "auto"
    # Where the trunk (and, in int8, the dense score head) runs: torch; onnx
    # (ONNX Runtime, float32 trunk, CPU only); onnx-int8: the weights' int8
    # trunk + score head (deepmask quantize) in ONNX Runtime, CPU only.
    # auto: onnx-int8 on an x86-64 CPU with AVX2 (VNNI or not: its 7-bit
    # weights are exact on both) when the weights have an int8 network and
    # precision is not fp32 (fp32 means fp32 throughout): the fastest CPU
    # path measured on both kinds of x86 CPU, with recall within 0.005 mask
    # AR@100 of fp32's on coco-val (docs/benchmarks.md). torch elsewhere,
    # GPUs included.
    runtime: str = "auto"

    def __post_init__(self) -> None:
        self.check_types()
        if self.scale_step <= 0:
            raise ConfigError(f"scale_step must be > 0, got {self.scale_step}")
        if self.scale_max < self.scale_min:
            raise ConfigError(f"scale_max ({self.scale_max}) < scale_min ({self.scale_min})")
        lo, hi = SCALE_RANGE
        if self.scale_min < lo or self.scale_max > hi:
            raise ConfigError(f"scales must lie within 2^{lo:g}..2^{hi:g} (octaves {lo:g} to {hi:g}), "
                              f"got {self.scale_min:g}..{self.scale_max:g}")
        if (self.scale_max - self.scale_min) / self.scale_step + 1 > MAX_SCALES + 1e-6:
            raise ConfigError(f"the pyramid {self.scale_min:g},{self.scale_max:g},{self.scale_step:g} has more than "
                              f"{MAX_SCALES} scales; take a larger step")
        check_range(self, "max_side", 32, MAX_SIDE)
        check_range(self, "pre_nms_topk", hi=MAX_PROPOSALS)
        check_range(self, "max_proposals", hi=MAX_PROPOSALS)
        check_range(self, "refine_topk", hi=MAX_PROPOSALS)
        check_range(self, "paste_chunk", hi=1 << 20)
        check_range(self, "shape_bucket", -1, 4096)
        if self.nms not in ("box", "mask"):
            raise ConfigError(f"nms must be 'box' or 'mask', got {self.nms!r}")
        for name in ("mask_thresh",):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"{name} is a probability in (0, 1), got {v}")
        if not 0.0 <= self.score_thresh < 1.0:
            raise ConfigError(f"score_thresh is a probability in [0, 1), got {self.score_thresh}")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ConfigError(f"nms_thresh must be in (0, 1] (1 turns NMS off), got {self.nms_thresh}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.paste_chunk < 0:
            raise ConfigError(f"paste_chunk must be >= 0 (0: automatic), got {self.paste_chunk}")
        if self.refine_topk < 0:
            raise ConfigError(f"refine_topk must be >= 0, got {self.refine_topk}")
        if self.max_proposals <= 0 or self.pre_nms_topk <= 0:
            raise ConfigError("max_proposals and pre_nms_topk must be positive")

    @property
    def scales(self) -> tuple[float, ...]:
        """The pyramid's scale factors, smallest first."""
        n = int(math.floor((self.scale_max - self.scale_min) / self.scale_step + 1e-6)) + 1
        return tuple(2.0 ** (self.scale_min + i * self.scale_step) for i in range(n))

    def replace(self, **changes: Any) -> "InferenceConfig":
        """A copy with the given fields changed; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})



@dataclass(frozen=True)
class SamplerConfig(Serialisable):
    """How training patches are cut from images (the paper's labelling rule).

    A positive patch has an object centred within ``pos_shift`` pixels and with
    its longer side within ``pos_scale`` octaves of ``object_size`` (both at the
    patch's resolution). A negative is shifted by at least ``neg_shift`` pixels or
    scaled by at least ``neg_scale`` octaves from every object.
    """

    pos_fraction: float = 0.5
    pos_shift: float = 16.0
    pos_scale: float = 0.25
    neg_shift: float = 32.0
    neg_scale: float = 1.0
    min_object_area: float = 100.0
    min_object_side: float = 5.0
    hard_neg_fraction: float = 0.5
    hflip: bool = True
    color_jitter: float = 0.2

    def __post_init__(self) -> None:
        self.check_types()
        for name in ("pos_fraction", "hard_neg_fraction", "color_jitter"):
            check_range(self, name, 0.0, 1.0)
        for name in ("pos_shift", "pos_scale", "neg_shift", "neg_scale", "min_object_area", "min_object_side"):
            check_range(self, name, 0.0)



@dataclass(frozen=True)
class TrainConfig(Serialisable):
    """Optimisation for ``deepmask train`` (defaults: the paper and official code)."""

    steps: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # The official code's schedule, 300 epochs of 4000 batches: lr x1 until
    # epoch 50, x0.5 until 120, x0.1 after. Kept as fractions of the run.
    lr_milestones: tuple[float, ...] = (50 / 300, 120 / 300)
    lr_factors: tuple[float, ...] = (0.5, 0.1)
    score_weight: float = 1.0 / 32.0
    trunk_lr_mult: float = 1.0
    freeze_trunk: bool = False
    # With freeze_trunk: the trunk's last N blocks train all the same (at
    # stride 16, as the paper fine-tunes its trunk; on cached maps, maps of
    # their input are cached). 0: none.
    train_blocks: int = 0
    # Train the heads on cached frozen-trunk maps of the inference pyramid
    # (deepmask_cli.training.featcache): the fast path on a CPU; needs freeze_trunk.
    cache_features: bool = False
    # Pyramid (min, max, step in octaves) of the feature cache; None: the
    # inference defaults' scales.
    cache_scales: tuple[float, float, float] | None = None
    # File the feature cache is saved to and reused from (None: memory only).
    cache_file: str | None = None
    # Dropout on the trunk's features before the heads, in training only: the
    # regulariser that cached features leave room for (they get no pixel-level
    # augmentation).
    feature_dropout: float = 0.0
    # COCO category ids to train on (the others are left unlabelled, as
    # background); None: all. The paper's generalisation test trains on the 20
    # PASCAL VOC categories (deepmask_cli.training.data.VOC_CATEGORIES).
    categories: tuple[int, ...] | None = None
    # Composites of copy-paste augmentation (deepmask_cli.training.copypaste) added to
    # the training images: each a training image with another's objects
    # pasted on it. 0: none.
    copy_paste: int = 0
    # SharpMask's refinement: pixels of the photo around each training window
    # that the trunk sees before its maps are cropped to the window, so that
    # they are like the whole photo's maps that the refinement reads at inference.
    refine_context: int = 64
    workers: int = 1
    seed: int = 0
    checkpoint_every: int = 1000
    val_every: int = 1000
    val_batches: int = 20
    amp: bool = True
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        self.check_types()
        if not isinstance(self.sampler, SamplerConfig):
            raise ConfigError(f"TrainConfig.sampler must be a SamplerConfig, got {self.sampler!r}")
        for name in ("steps", "batch_size", "workers", "checkpoint_every", "val_every", "val_batches"):
            check_range(self, name, 0 if name == "workers" else 1)
        for name in ("momentum", "feature_dropout"):
            check_range(self, name, 0.0, 1.0)
        for name in ("lr", "weight_decay", "score_weight", "trunk_lr_mult", "train_blocks", "copy_paste"):
            check_range(self, name, 0)
        check_range(self, "refine_context", 0, 512)
        if self.refine_context % TRUNK_STRIDE:
            raise ConfigError(f"refine_context must be a multiple of the trunk's stride ({TRUNK_STRIDE}), "
                              f"got {self.refine_context}")

    #: Fields whose default depends on the device a run trains on. On a CPU,
    #: back-propagating through the trunk makes each step tens of times
    #: slower, so a CPU run trains the heads on the frozen trunk's cached maps
    #: unless told otherwise (the recipe of the shipped weights).
    DEVICE_DEFAULTS = {"cpu": {"freeze_trunk": True, "cache_features": True}}

    #: Defaults of a run that trains the heads on cached maps (the recipe of
    #: the shipped weights; weights/*/MODEL_CARD.md has its ablations). Only
    #: the heads learn, so they take a larger lr than the official 1e-3, with
    #: the score loss's weight cut by as much (1/320: the score head at the
    #: official rate; at 1/32 the first steps silence most of its units, a
    #: lottery over seeds); dropout on the cached maps stands in for the
    #: pixel-level augmentation they cannot get; the quarter-octave pyramid
    #: gives every object about two cached scales within the positives'
    #: quarter octave.
    CACHED_HEADS_DEFAULTS = {"steps": 12000, "lr": 0.01, "score_weight": 1.0 / 320.0, "feature_dropout": 0.2,
                             "cache_scales": (-2.5, 1.0, 0.25)}

    @classmethod
    def for_device(cls, device_type: str, **given: Any) -> TrainConfig:
        """The defaults for a run on ``device_type`` (``"cpu"``, ``"cuda"``),
        with ``given`` fields (None: not given) on top. A trunk that is to be
        trained is not cached; a run on cached maps gets
        :data:`CACHED_HEADS_DEFAULTS`."""
        device = dict(cls.DEVICE_DEFAULTS.get(device_type, {}))
        if given.get("freeze_trunk") is False:
            device.pop("cache_features", None)
        given = {k: v for k, v in given.items() if v is not None}
        fields_ = {**device, **given}
        if fields_.get("cache_features", cls.cache_features):
            fields_ = {**cls.CACHED_HEADS_DEFAULTS, **fields_}
        return cls(**fields_)

    def chosen_defaults(self, **given: Any) -> dict[str, Any]:
        """The fields of this config (from :meth:`for_device`) away from the
        class's defaults though not ``given`` (None: not given), with their
        values: what a run should say it chose."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if given.get(f.name) is None and f.name != "sampler" and getattr(self, f.name) != f.default}
