"""The library entry point: images in, a Proposals dataclass out."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from deepmask_cli import Proposer, load_proposer
from deepmask_cli.formats import rle
from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.modeling.model import DeepMask
from conftest import PINNED, TUNED
from synth import tiny_model, trunk_levels_calls


def _proposer(cfg, **kw):
    """A tiny model's proposer, in fp32 torch unless the test asks otherwise."""
    return Proposer(tiny_model(cfg), InferenceConfig(**{"scale_min": -1, "scale_max": 0, "scale_step": 0.5, **PINNED, **TUNED, **kw}),
                    "cpu")


def test_pil_array_and_tensor_inputs_agree(tiny_config):
    p = _proposer(tiny_config, max_proposals=30)
    arr = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    a = p(arr)
    b = p(Image.fromarray(arr))
    c = p(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    for other in (b, c):
        torch.testing.assert_close(a.scores, other.scores)
        assert torch.equal(a.masks, other.masks)
    assert a.masks.shape == (len(a), 70, 90) and a.masks.dtype == torch.bool
    assert a.boxes_xyxy.shape == (len(a), 4) and a.image_size == (70, 90)
    assert torch.all(a.scores[:-1] >= a.scores[1:])
    # RLE mode gives the same masks, encoded
    r = p(arr, rle=True)
    assert r.masks is None and len(r.to_rles()) == len(a)
    assert r.to_rles() == a.to_rles()
    # ... by the crop-run path, with the same boxes and areas as the full masks give
    assert torch.equal(r.boxes_xyxy, a.boxes_xyxy) and torch.equal(r.scores, a.scores)
    assert np.array_equal(r.mask_areas(), a.masks.sum((1, 2)).numpy())


def test_grayscale_and_rgba_arrays(tiny_config):
    p = _proposer(tiny_config, max_proposals=5)
    gray = np.full((40, 50), 128, np.uint8)
    rgba = np.zeros((40, 50, 4), np.uint8)
    assert p(gray).masks.shape[1:] == (40, 50)
    assert p(rgba).masks.shape[1:] == (40, 50)


def test_batch_of_same_size_images_equals_one_by_one(tiny_config):
    p = _proposer(tiny_config, max_proposals=20)
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    batch = p.propose_batch(ims)
    for im, got in zip(ims, batch):
        want = p(im)
        # same windows with the same scores and masks (order may differ among
        # near-ties: batched convolutions round differently)
        torch.testing.assert_close(got.scores, want.scores)
        key = lambda pr: sorted(zip(pr.windows_xyxy.tolist(), range(len(pr))))
        for (wa, ia), (wb, ib) in zip(key(got), key(want)):
            assert wa == wb
            assert (got.masks[ia] ^ want.masks[ib]).float().mean() < 0.01


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("nms_thresh, demote, rescore", [(1.0, True, False), (0.6, False, False), (0.6, True, True)])
def test_batch_of_different_sizes_gives_each_image_its_own_runs(tiny_config, mixed, nms_thresh, demote, rescore):
    """RLE proposals of a batch of images of different sizes (ranked, masks
    pasted and box NMS done for the whole batch at once; ``mixed``:
    pasted in small chunks that mix images and scales, as on a GPU) are each
    image's own: those of the same batch made whole-mask image by image."""
    p = _proposer(tiny_config, max_proposals=25, nms_thresh=nms_thresh, nms_demote=demote, maskness=rescore)
    p.paste_chunk, p.paste_mixed = 7, mixed
    rng = np.random.default_rng(5)
    ims = [rng.integers(0, 255, size, dtype=np.uint8) for size in ((64, 80, 3), (37, 50, 3), (90, 41, 3))]
    runs = p.propose_batch(ims, rle=True)
    whole = p.propose_batch(ims)
    for im, r, w in zip(ims, runs, whole):
        assert r.image_size == w.image_size == im.shape[:2]
        assert 0 < len(r) <= 25 and len(r) == len(w)
        assert torch.equal(r.scores, w.scores) and torch.equal(r.windows_xyxy, w.windows_xyxy)
        assert torch.equal(r.boxes_xyxy, w.boxes_xyxy)
        assert r.to_rles() == w.to_rles()


def test_padded_batch_gives_the_real_images_levels(tiny_config):
    """dense_pass(pad_to=N) runs blank images after the real ones (a GPU's
    short last batch keeps the other batches' shapes) and returns the real
    images' maps and scores alone, as the unpadded pass gives them."""
    from deepmask_cli.inference.pyramid import image_to_tensor

    p = _proposer(tiny_config, shape_bucket=64)
    rng = np.random.default_rng(7)
    ts = [image_to_tensor(rng.integers(0, 255, size, dtype=np.uint8)) for size in ((64, 80, 3), (50, 33, 3))]
    plain, padded = p.dense_pass(ts), p.dense_pass(ts, pad_to=4)
    assert len(plain) == len(padded)
    for a, b in zip(plain, padded):
        assert b.fmap.shape[0] == b.scores.shape[0] == 2 and b.sizes == a.sizes
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
    want = p.propose_batch([t for t in ts], rle=True)
    got = p.proposals_from_levels(padded, [tuple(t.shape[1:]) for t in ts], rle=True)
    for g, w in zip(got, want):
        assert g.to_rles()[:10] == w.to_rles()[:10]


def test_runs_come_back_as_int32_unless_they_need_more():
    from deepmask_cli.formats.proposals import to_host as _to_host

    small = _to_host(torch.tensor([0, 5, 2**31 - 1]))
    assert small.dtype == np.int32 and small.tolist() == [0, 5, 2**31 - 1]
    big = _to_host(torch.tensor([0, 2**31]))
    assert big.dtype == np.int64 and big.tolist() == [0, 2**31]
    assert _to_host(torch.zeros(0, dtype=torch.long)).size == 0


def test_a_score_threshold_that_keeps_nothing_gives_empty_proposals(tiny_config):
    p = _proposer(tiny_config, score_thresh=1 - 1e-9)
    ims = [np.zeros((40, 50, 3), np.uint8), np.zeros((30, 20, 3), np.uint8)]
    for rle_mode in (True, False):
        out = p.propose_batch(ims, rle=rle_mode)
        assert [len(r) for r in out] == [0, 0] and [r.to_rles() for r in out] == [[], []]
        assert [r.image_size for r in out] == [(40, 50), (30, 20)]


def test_thresholds_and_cap(tiny_config):
    arr = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    loose = _proposer(tiny_config, max_proposals=1000)(arr)
    capped = _proposer(tiny_config, max_proposals=3)(arr)
    assert len(capped) == 3
    torch.testing.assert_close(capped.scores, loose.scores[:3])
    t = float(loose.scores[len(loose) // 2])
    cut = _proposer(tiny_config, score_thresh=t)(arr)
    assert bool((cut.scores >= t - 1e-6).all())
    assert int((loose.scores > t + 1e-6).sum()) <= len(cut) <= int((loose.scores >= t - 1e-6).sum())
    nms = _proposer(tiny_config, nms_thresh=0.5, nms_demote=False)(arr)
    from torchvision.ops import box_iou

    iou = box_iou(nms.boxes_xyxy, nms.boxes_xyxy) - torch.eye(len(nms))
    assert float(iou.max()) <= 0.5 + 1e-6
    mask_nms = _proposer(tiny_config, nms="mask", nms_thresh=0.5, nms_demote=False)(arr)
    from deepmask_cli.formats import rle

    enc = mask_nms.to_rles()
    m_iou = rle.iou(enc, enc) - np.eye(len(enc))
    assert m_iou.max() <= 0.5 + 1e-6
    as_rles = _proposer(tiny_config, nms="mask", nms_thresh=0.5, nms_demote=False)(arr, rle=True)  # RLEs made once, for NMS and output
    assert as_rles.to_rles() == enc and torch.equal(as_rles.scores, mask_nms.scores)


@pytest.mark.parametrize("rle_mode", [False, True])
@pytest.mark.parametrize("kind", ["box", "mask"])
def test_nms_demote_keeps_the_suppressed_behind_their_suppressor(tiny_config, rle_mode, kind):
    """nms_demote: NMS's survivors with their scores, and every proposal it
    suppressed too, its score times (1 - its IoU with the best survivor that
    suppressed it): the same set as without NMS, ranked by those scores."""
    from deepmask_cli.inference.ranking import demotion

    arr = np.random.default_rng(3).integers(0, 255, (72, 64, 3), dtype=np.uint8)
    k = 40
    kw = dict(max_proposals=k, pre_nms_topk=k, nms=kind)
    plain = _proposer(tiny_config, nms_thresh=1.0, **kw)(arr, rle=rle_mode)
    drop = _proposer(tiny_config, nms_thresh=0.5, nms_demote=False, **kw)(arr, rle=rle_mode)
    demote = _proposer(tiny_config, nms_thresh=0.5, nms_demote=True, **kw)(arr, rle=rle_mode)
    assert 0 < len(drop) < len(demote) == len(plain) == k
    rles = plain.to_rles()
    iou = box_iou(plain.boxes_xyxy, plain.boxes_xyxy) if kind == "box" else torch.from_numpy(rle.iou(rles, rles))
    kept = torch.tensor([tuple(w) in set(map(tuple, drop.windows_xyxy.tolist())) for w in plain.windows_xyxy.tolist()])
    want = plain.scores * demotion(iou[kept][:, ~kept], kept)
    order = torch.argsort(want, descending=True, stable=True)
    torch.testing.assert_close(demote.scores, want[order])
    assert torch.equal(demote.windows_xyxy, plain.windows_xyxy[order])
    assert demote.to_rles() == [rles[i] for i in order.tolist()]


@pytest.mark.parametrize("rle_mode", [False, True])
def test_maskness_rescores_the_same_windows(tiny_config, rle_mode):
    """maskness: the same windows as without it, each score times its mask's
    mean probability over the kept pixels (in (mask_thresh, 1]: an empty mask
    is dropped), ranked by the new scores."""
    arr = np.random.default_rng(3).integers(0, 255, (72, 64, 3), dtype=np.uint8)
    kw = dict(max_proposals=40, nms_thresh=1.0, mask_thresh=0.4)
    plain = _proposer(tiny_config, maskness=False, **kw)(arr, rle=rle_mode)
    rescored = _proposer(tiny_config, maskness=True, **kw)(arr, rle=rle_mode)
    assert len(rescored) == len(plain) > 0
    assert torch.all(rescored.scores[:-1] >= rescored.scores[1:])
    before = {tuple(w): float(sc) for w, sc in zip(plain.windows_xyxy.tolist(), plain.scores)}
    ratio = torch.tensor([float(sc) / before[tuple(w)] for w, sc in zip(rescored.windows_xyxy.tolist(), rescored.scores)])
    assert bool(((ratio > 0.4) & (ratio < 1)).all()) and float(ratio.std()) > 0.01, ratio


def test_load_proposer_applies_the_weights_defaults_then_overrides(tiny_weights):
    p = load_proposer(tiny_weights, device="cpu")
    assert p.config.max_proposals == 50 and p.config.scale_min == -1.0
    p = load_proposer(tiny_weights, device="cpu", overrides={"max_proposals": 9, "mask_thresh": None})
    # the weights' tuned value, not the library's neutral default
    assert p.config.max_proposals == 9 and p.config.mask_thresh == TUNED["mask_thresh"] != InferenceConfig().mask_thresh


def test_bucketed_square_canvases_propose_the_same_windows(tiny_config):
    """GPU-style canvases (square, side rounded up to a bucket) only add
    padding: every window still lies on the image's own grid, none comes from
    the extra canvas, and the proposals are nearly those of tight canvases
    (features near the old canvas edge see a little more padding)."""
    arr = np.random.default_rng(3).integers(0, 255, (70, 110, 3), dtype=np.uint8)
    tight = _proposer(tiny_config, max_proposals=40, shape_bucket=0)(arr)
    square = _proposer(tiny_config, max_proposals=40, shape_bucket=128)(arr)
    assert len(square) == len(tight)
    every = _proposer(tiny_config, max_proposals=10**6, pre_nms_topk=10**6, mask_thresh=1e-6, shape_bucket=0)(arr)
    allowed = {tuple(w) for w in every.windows_xyxy.round(decimals=2).tolist()}
    assert {tuple(w) for w in square.windows_xyxy.round(decimals=2).tolist()} <= allowed
    same = {tuple(w) for w in tight.windows_xyxy.round().tolist()} & {tuple(w) for w in square.windows_xyxy.round().tolist()}
    assert len(same) >= 0.8 * len(tight)
    iou = rle.iou(tight.to_rles()[:10], square.to_rles()[:10]).max(1)
    assert iou.mean() > 0.8


def test_onnx_runtime_trunk_gives_the_same_proposals(tiny_config):
    """--runtime onnx (the trunk in ONNX Runtime) proposes the same windows
    in the same order with the same masks as torch, up to float rounding."""
    pytest.importorskip("onnxruntime")
    arr = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    ref = _proposer(tiny_config, max_proposals=30, precision="fp32")(arr)
    got = _proposer(tiny_config, max_proposals=30, precision="fp32", runtime="onnx")(arr)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=1e-4)
    # near-ties may swap places; each window keeps its score and mask
    key = lambda p: {tuple(w): (float(s), m) for w, s, m in zip(p.windows_xyxy.round(decimals=2).tolist(), p.scores, p.masks)}
    a, b = key(ref), key(got)
    common = a.keys() & b.keys()
    assert len(common) >= len(a) - 2
    for w in common:
        assert abs(a[w][0] - b[w][0]) < 1e-4 and (a[w][1] != b[w][1]).float().mean() < 1e-3


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_runtime_is_refused_on_a_gpu_device_name(tiny_config, runtime):
    """The refusal is ONNX Runtime's own (asked of the session directly, so
    that a machine without a GPU refuses for this reason, not for lacking one)."""
    from deepmask_cli.core.errors import ConfigError
    from deepmask_cli.inference.runtime import onnx_session

    model = DeepMask(tiny_config)
    with pytest.raises(ConfigError, match=f"runtime {runtime} runs the trunk on the CPU; use runtime torch"):
        onnx_session(model.trunk, torch.device("cuda"), runtime, None, model)


def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    from deepmask_cli.inference import runtime as inference

    monkeypatch.setattr(inference, "native_bf16", lambda: True)
    assert inference.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert inference.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert inference.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(inference, "native_bf16", lambda: False)
    assert inference.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert inference.resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_networks_arithmetic(tiny_config, precision, dtype):
    p = _proposer(tiny_config, max_proposals=20, precision=precision)
    seen = []
    p.trunk.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    got = p(np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8), rle=True)
    assert p.precision == precision and seen and set(seen) == {dtype}
    # outputs leave the network as float32 whatever it computed in
    assert got.scores.dtype == torch.float32 and len(got) == 20


def test_int8_dot_products_are_read_from_cpu_flags():
    from deepmask_cli.inference.runtime import cpuinfo_has_int8_dot

    assert cpuinfo_has_int8_dot("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
    assert cpuinfo_has_int8_dot("flags\t: fpu avx2 avx_vnni\n")
    assert not cpuinfo_has_int8_dot("flags\t: fpu sse2 avx2 fma avx512f avx512bw\n")  # AVX512 without VNNI
    assert not cpuinfo_has_int8_dot("Features\t: fp asimd asimddp\n")  # an ARM CPU: not measured, so no
    assert not cpuinfo_has_int8_dot("")


def test_describe_cpu_names_the_model_and_the_instruction_sets_that_matter():
    from deepmask_cli.inference.runtime import describe_cpu

    text = describe_cpu("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n")
    assert text == "AMD EPYC; has: avx2 fma; lacks: avx512f avx512_vnni avx_vnni avx512_bf16 amx_tile"
    assert "has: avx2 fma avx512f avx512_vnni avx512_bf16" in describe_cpu(
        "model name : Xeon\nflags : avx2 fma avx512f avx512_vnni avx512_bf16\n")


def test_canvas_sides_share_few_shapes():
    """GPU canvases: 128-pixel steps from 640 up, so every photo of 640
    pixels or less (all of COCO) shares one shape and 2048 stays 2048."""
    from deepmask_cli.inference.pyramid import GPU_MIN_SIDE, GPU_SHAPE_BUCKET, canvas_side

    gpu = lambda longest: canvas_side(longest, GPU_SHAPE_BUCKET, GPU_MIN_SIDE)
    assert {gpu(n) for n in (1, 200, 384, 500, 512, 612, 640)} == {640}
    assert [gpu(n) for n in (641, 768, 769, 2047, 2048)] == [768, 768, 896, 2048, 2048]
    assert canvas_side(500, 128) == 512 and canvas_side(500, 0) == 0


def test_refined_masks_are_each_windows_crop_of_the_whole_maps_refined(tiny_config):
    """With SharpMask's refinement, the best windows' masks are the refinement
    of their crops of the whole canvas's maps (the dense pass's stride-16 map
    and the trunk's finer maps), pasted; the scores and the others are
    DeepMask's; refine_topk 0 or --no-refine give DeepMask's proposals exactly."""
    import dataclasses

    from deepmask_cli.inference.paste import paste_masks
    from deepmask_cli.inference.ranking import logit
    from deepmask_cli.inference.pyramid import image_to_tensor, level_size, pyramid_canvas

    cfg = dataclasses.replace(tiny_config, refine=(8, 4))
    model = tiny_model(cfg)
    arr = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    kw = dict(scale_min=-1, scale_max=0, scale_step=0.5, max_proposals=20, nms_thresh=1.0, **{**PINNED, **TUNED})
    plain = Proposer(model, InferenceConfig(refine=False, **kw), "cpu")(arr)
    assert not Proposer(model, InferenceConfig(refine=False, **kw), "cpu").refining
    none = Proposer(model, InferenceConfig(refine_topk=0, **kw), "cpu")(arr)
    assert torch.equal(none.masks, plain.masks) and torch.equal(none.scores, plain.scores)
    k = 3
    refined = Proposer(model, InferenceConfig(refine_topk=k, **kw), "cpu")(arr)
    torch.testing.assert_close(refined.scores, plain.scores)
    torch.testing.assert_close(refined.windows_xyxy, plain.windows_xyxy)
    assert torch.equal(refined.masks[k:], plain.masks[k:])
    assert not torch.equal(refined.masks[:k], plain.masks[:k])
    # the first proposal's mask, from its patch, independently
    image = image_to_tensor(arr)
    h, w = image.shape[1:]
    scale = float(refined.scales[0])
    lh, lw = level_size(h, w, scale, 2048)
    canvas = pyramid_canvas([image], [(lh, lw)], cfg.patch_size, model.normalize)[0]
    x0, y0, x1, y1 = refined.windows_xyxy[0].tolist()
    j, i = round((x0 + x1) / 2 * lw / w / 16), round((y0 + y1) / 2 * lh / h / 16)
    with torch.no_grad():
        maps = model.eval().trunk.levels(canvas[None])
        f = cfg.feat_size
        crops = {s: maps[s][:, :, i * 16 // s: (i + f) * 16 // s, j * 16 // s: (j + f) * 16 // s] for s in (16, 8)}
        logits = model.refine_levels(crops)
    want = paste_masks(logits, refined.windows_xyxy[:1], h, w, logit(TUNED["mask_thresh"]))[0]
    got = refined.masks[0]
    assert got.sum() > 0 and float((want & got).sum()) / float((want | got).sum()) > 0.98
    # with NMS, the windows refined are the k best that NMS keeps, and it keeps DeepMask's
    kw.update(nms_thresh=0.3, nms_demote=False)
    plain = Proposer(model, InferenceConfig(refine=False, **kw), "cpu")(arr)
    refined = Proposer(model, InferenceConfig(refine_topk=k, **kw), "cpu")(arr)
    assert len(plain.scores) < 20  # NMS did drop windows
    torch.testing.assert_close(refined.scores, plain.scores)
    torch.testing.assert_close(refined.windows_xyxy, plain.windows_xyxy)
    assert torch.equal(refined.masks[k:], plain.masks[k:])
    assert all(not torch.equal(a, b) for a, b in zip(refined.masks[:k], plain.masks[:k])), [(int(a.sum()), int(b.sum())) for a, b in zip(refined.masks, plain.masks)]


def test_untrained_refinement_gives_deepmasks_own_masks(tiny_config):
    """A refinement whose correction is still zero (``refine_from_mask``)
    gives the masks of the dense pass, only at a finer resolution: the
    refinement reads the window's crop of the same maps as DeepMask's masks
    (a window's own patch through the trunk gives other maps, most of all
    at its borders, and other masks)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_config, refine=(8, 4))
    model = tiny_model(cfg)
    torch.nn.init.zeros_(model.refine_head.predict.weight)  # as before training (tiny_model scales every layer)
    torch.nn.init.zeros_(model.refine_head.predict.bias)
    arr = np.random.default_rng(8).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    kw = dict(scale_min=-1, scale_max=0, scale_step=0.5, max_proposals=20, nms_thresh=1.0, **{**PINNED, **TUNED})
    plain = Proposer(model, InferenceConfig(refine=False, **kw), "cpu")(arr)
    refined = Proposer(model, InferenceConfig(refine_topk=20, **kw), "cpu")(arr)
    assert len(plain.masks) == 20 and plain.masks.flatten(1).any(1).all()
    inter = (plain.masks & refined.masks).flatten(1).sum(1).float()
    union = (plain.masks | refined.masks).flatten(1).sum(1).float()
    assert (inter / union).min() > 0.9, inter / union


def test_refinement_reads_the_finer_maps_of_the_dense_pass(tiny_config):
    """The dense pass keeps the trunk's finer maps for the refinement, which
    runs no trunk of its own: the trunk in torch makes one pass per pyramid
    level in all, and the trunk in ONNX returns them beside the stride-16
    map (none in torch). Both give the same proposals. (An int8 trunk made
    without them: tests/export/test_quantize.py.)"""
    import dataclasses

    from deepmask_cli.inference.pyramid import image_to_tensor

    pytest.importorskip("onnxruntime")
    model = tiny_model(dataclasses.replace(tiny_config, refine=(8, 4)))
    arr = np.random.default_rng(9).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    kw = dict(scale_min=-1, scale_max=0, scale_step=0.5, max_proposals=20, nms_thresh=1.0, refine_topk=5,
              **{**PINNED, **TUNED})
    got = {}
    for runtime in ("torch", "onnx"):
        proposer = Proposer(model, InferenceConfig(**{**kw, "runtime": runtime}), "cpu")
        calls = trunk_levels_calls(proposer)
        pyramid = proposer.dense_pass([image_to_tensor(arr)])
        assert all(set(lv.finer) == {8} and lv.canvas is None for lv in pyramid)
        got[runtime] = proposer.proposals_from_levels(pyramid, [(70, 90)])[0]
        assert calls == ([16] * 3 if runtime == "torch" else [])
    torch.testing.assert_close(got["onnx"].scores, got["torch"].scores, atol=1e-4, rtol=1e-4)
    assert (got["onnx"].masks != got["torch"].masks).float().mean() < 1e-3


@pytest.mark.parametrize("width", [96, 90])
def test_flip_pairs_each_window_with_its_mirror_twin(tiny_config, width):
    """InferenceConfig.flip: the mirror pass of a photo of any width scores,
    window by window, what a plain pass scores on the mirror image shifted
    onto the stride's grid (padded on the left with the neutral colour): the
    mirrored canvas keeps every window's twin on the grid."""
    p = _proposer(tiny_config, flip=True, scale_min=0, scale_max=0)
    arr = np.random.default_rng(5).integers(0, 255, (70, width, 3), dtype=np.uint8)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    (lv,) = p.dense_pass([t])
    shift = -width % 16
    mirror = torch.cat([p.model.mean[0].expand(3, 70, shift), t.flip(2)], 2)
    (plain,) = _proposer(tiny_config, scale_min=0, scale_max=0).dense_pass([mirror])
    assert plain.scores.shape == lv.scores_flip.shape
    torch.testing.assert_close(lv.scores_flip, plain.scores.flip(2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(lv.scores_flip, lv.scores, atol=1e-3)
    # the fused trunk's maps: the mirror pass's is the shifted mirror image's
    torch.testing.assert_close(lv.fmap_flip, plain.fmap, atol=1e-4, rtol=1e-4)


def test_flip_proposes_the_mirror_image_mirrored(tiny_config):
    """With flip, a photo and its mirror image (of a width on the stride's
    grid, so that their canvases are mirrors) get mirrored proposals; without
    it the network, not symmetric, gives other scores."""
    arr = np.random.default_rng(6).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    mirror = np.ascontiguousarray(arr[:, ::-1])
    on = _proposer(tiny_config, flip=True, scale_min=0, scale_max=0, max_proposals=30)
    a, b = on(arr), on(mirror)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    assert (a.masks != b.masks.flip(2)).float().mean() < 1e-3
    off = _proposer(tiny_config, scale_min=0, scale_max=0, max_proposals=30)
    assert not torch.allclose(off(arr).scores, off(mirror).scores, atol=1e-3)
    assert not torch.allclose(off(arr).scores, a.scores, atol=1e-3)


def test_scale_prior_shifts_each_levels_logits_by_its_octave(tiny_config):
    """scale_prior adds prior * log2(scale) to every window's objectness
    logit: with a large one, the finest level's windows come first."""
    arr = np.random.default_rng(7).integers(0, 255, (70, 90, 3), dtype=np.uint8)

    def every_window(**kw):
        return _proposer(tiny_config, max_proposals=10**6, pre_nms_topk=10**6, maskness=False, nms_thresh=1.0, **kw)(arr)

    plain, favoured = every_window(), every_window(scale_prior=50.0)
    assert favoured.scales[: (plain.scales == 1.0).sum()].eq(1.0).all()
    assert not plain.scales[: (plain.scales == 1.0).sum()].eq(1.0).all()
    # the same windows, each logit moved by its octave times the prior
    key = lambda pr: {(tuple(w), s): sc for w, s, sc in zip(pr.windows_xyxy.round(decimals=2).tolist(),
                                                             pr.scales.tolist(), pr.scores.tolist())}
    kp, kf = key(plain), key(every_window(scale_prior=0.5))
    assert kp.keys() == kf.keys()
    for k, sc in kp.items():
        want = torch.sigmoid(torch.logit(torch.tensor(sc, dtype=torch.float64)) + 0.5 * np.log2(k[1]))
        assert abs(kf[k] - float(want)) < 1e-4
