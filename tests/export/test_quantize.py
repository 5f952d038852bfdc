"""deepmask quantize: an int8 trunk in ONNX Runtime (--runtime onnx-int8)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from deepmask_cli.cli.main import main
from deepmask_cli.core.config import InferenceConfig, ModelConfig
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.modeling.weights import load_weights

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _photos(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        # smooth blobs rather than noise: activations with some structure
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((120, 90), Image.BILINEAR).save(folder / f"p{k}.png")
    return folder


def test_int8_trunk_is_quantized_calibrated_and_close_to_float(tiny_weights, tmp_path):
    from deepmask_cli.export.quantize import quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    photos = sorted(_photos(tmp_path / "photos").iterdir())
    out = quantize_trunk(model, photos, tmp_path / "t.onnx", limit=2)
    m = onnx.load(str(out))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in m.graph.initializer)  # int8 weights
    props = {p.key: p.value for p in m.metadata_props}
    calib = json.loads(props["calibration"])
    assert calib["images"] == ["p0.png", "p1.png"] and calib["method"] == "minmax"
    assert props["weight_bits"] == "7"  # exact without VNNI too (no int16 saturation)
    w = [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(a).max()) for a in w) <= 64
    assert ModelConfig.from_dict(json.loads(props["deepmask_config"])) == model.config

    # the int8 trunk's map follows the float one closely
    cfg = InferenceConfig(scale_min=0, scale_max=0, precision="fp32")
    f32 = Proposer(model, cfg, "cpu")
    i8 = Proposer(model, cfg.replace(runtime="onnx-int8"), "cpu", int8_trunk=out)
    img = torch.from_numpy(np.array(Image.open(photos[2]))).permute(2, 0, 1).float() / 255
    lf, li = f32.dense_pass([img])[0], i8.dense_pass([img])[0]
    # (8-bit weights saturate on a CPU without VNNI: 0.94 there, against 0.997 with 7)
    assert torch.corrcoef(torch.stack([lf.fmap.flatten(), li.fmap.flatten()]))[0, 1] > 0.98
    # ... and so do the scores, which it computes too (the score head is in it)
    assert li.scores.shape == lf.scores.shape
    assert lf.scores.std() > 0.1
    assert torch.corrcoef(torch.stack([lf.scores.flatten(), li.scores.flatten()]))[0, 1] > 0.95
    assert len(i8(np.asarray(Image.open(photos[2])))) > 0


def test_cli_quantize_then_propose_with_the_int8_trunk(tiny_weights, tmp_path):
    photos = _photos(tmp_path / "photos")
    runner = CliRunner()
    # no int8 trunk yet: a one-line error that says how to make one
    r = runner.invoke(main, ["propose", str(photos), "-o", str(tmp_path / "a.json"), "--weights", str(tiny_weights),
                             "--device", "cpu", "--runtime", "onnx-int8"])
    assert r.exit_code == 2 and "deepmask quantize" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["quantize", str(photos), "--weights", str(tiny_weights), "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert (tiny_weights / "trunk-int8.onnx").is_file()
    r = runner.invoke(main, ["propose", str(photos), "-o", str(tmp_path / "b.json"), "--weights", str(tiny_weights),
                             "--device", "cpu", "--runtime", "onnx-int8"])
    assert r.exit_code == 0, r.output
    recs = json.loads((tmp_path / "b.json").read_text())
    assert {Path(r["file_name"]).name for r in recs} == {"p0.png", "p1.png", "p2.png"}


def test_cli_quantize_refuses_unreadable_photos_and_a_broken_model(tiny_weights, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    r = CliRunner().invoke(main, ["quantize", str(bad), "--weights", str(tiny_weights)])
    assert r.exit_code == 2 and "could be read" in r.output and "Traceback" not in r.output
    (tiny_weights / "trunk-int8.onnx").write_bytes(b"garbage")
    r = CliRunner().invoke(main, ["propose", str(_photos(tmp_path / "ok")), "-o", str(tmp_path / "c.json"),
                                  "--weights", str(tiny_weights), "--device", "cpu", "--runtime", "onnx-int8"])
    assert r.exit_code == 2 and "deepmask quantize" in r.output and "Traceback" not in r.output


def test_an_int8_trunk_made_from_other_weights_is_refused(tiny_weights, tmp_path):
    """A stale trunk-int8.onnx (the weights were retrained or replaced after
    quantizing) is caught, not silently run."""
    from deepmask_cli.modeling.model import DeepMask
    from deepmask_cli.export.quantize import quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    photos = sorted(_photos(tmp_path / "photos").iterdir())
    out = quantize_trunk(model, photos, tmp_path / "t.onnx", limit=1)
    cfg = InferenceConfig(scale_min=0, scale_max=0, runtime="onnx-int8")
    Proposer(model, cfg, "cpu", int8_trunk=out)  # its own weights: fine
    torch.manual_seed(1)
    other = DeepMask(model.config)
    with pytest.raises(ValueError, match="other weights"):
        Proposer(other, cfg, "cpu", int8_trunk=out)


def test_runtime_auto_takes_the_int8_trunk_only_where_it_pays(tiny_weights, tmp_path, monkeypatch):
    """auto: the int8 trunk on an x86-64 CPU with AVX2 when the weights
    have one and fp32 was not asked for; torch otherwise, and torch with a
    warning (not a failure) when the weights' int8 trunk is stale."""
    import deepmask_cli.inference.runtime as inference
    from deepmask_cli.modeling.model import DeepMask
    from deepmask_cli.export.quantize import quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    out = quantize_trunk(model, sorted(_photos(tmp_path / "photos").iterdir()), tmp_path / "t.onnx", limit=1)
    cfg = InferenceConfig(scale_min=0, scale_max=0)
    assert cfg.runtime == "auto"
    monkeypatch.setattr(inference, "int8_cpu", lambda: True)
    assert Proposer(model, cfg, "cpu", int8_trunk=out).runtime == "onnx-int8"
    assert Proposer(model, cfg.replace(precision="fp32"), "cpu", int8_trunk=out).runtime == "torch"
    assert Proposer(model, cfg, "cpu", int8_trunk=tmp_path / "none.onnx").runtime == "torch"
    assert Proposer(model, cfg, "cpu").runtime == "torch"
    assert inference.resolve_runtime("auto", torch.device("cuda"), out, "auto") == "torch"
    assert inference.resolve_runtime("torch", torch.device("cpu"), out, "auto") == "torch"
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="other weights"):
        assert Proposer(DeepMask(model.config), cfg, "cpu", int8_trunk=out).runtime == "torch"
    monkeypatch.setattr(inference, "int8_cpu", lambda: False)
    assert Proposer(model, cfg, "cpu", int8_trunk=out).runtime == "torch"


def test_cli_auto_runtime_warns_in_one_line_and_goes_on_without_a_stale_int8_trunk(tiny_weights, tmp_path, monkeypatch):
    import deepmask_cli.inference.runtime as inference
    from deepmask_cli.modeling.model import DeepMask
    from deepmask_cli.export.quantize import quantize_trunk

    monkeypatch.setattr(inference, "int8_cpu", lambda: True)
    photos = _photos(tmp_path / "photos")
    torch.manual_seed(1)
    quantize_trunk(DeepMask(load_weights(tiny_weights)[0].config), sorted(photos.iterdir()),
                   tiny_weights / "trunk-int8.onnx", limit=1)  # made from other weights
    r = CliRunner().invoke(main, ["propose", str(photos), "-o", str(tmp_path / "a.json"), "--weights", str(tiny_weights),
                                  "--device", "cpu", "--precision", "auto", "--runtime", "auto"])
    assert r.exit_code == 0, r.output
    warning = [line for line in r.output.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "deepmask quantize" in warning[0] and "Traceback" not in r.output
    assert len(json.loads((tmp_path / "a.json").read_text())) > 0


def test_trunk_and_score_head_export_computes_what_torch_does(tiny_weights):
    """The float network that quantize starts from: the trunk and the dense
    score head as one ONNX graph give torch's map and scores."""
    import io

    import onnxruntime as ort

    from deepmask_cli.inference.runtime import export_trunk_onnx

    model, _, _ = load_weights(tiny_weights)
    model.eval()
    trunk = model.trunk.fused()
    buf = io.BytesIO()
    export_trunk_onnx(trunk, buf, model.score_head)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    canvas = torch.randn(2, 3, 96, 128)
    fmap, scores = (torch.from_numpy(a) for a in session.run(None, {"canvas": canvas.numpy()}))
    with torch.no_grad():
        want_fmap = trunk(canvas)
        want = model.dense_scores(want_fmap)
    torch.testing.assert_close(fmap, want_fmap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-4)


def test_an_8bit_int8_trunk_is_refused_on_a_cpu_without_vnni(tiny_weights, tmp_path, monkeypatch):
    """A file from before 7-bit weights would give wrong maps without VNNI:
    refused there with the fix, and auto goes on in torch with a warning."""
    import deepmask_cli.inference.runtime as inference
    from deepmask_cli.export.quantize import quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    out = quantize_trunk(model, sorted(_photos(tmp_path / "photos").iterdir()), tmp_path / "t.onnx", limit=1)
    m = onnx.load(str(out))
    props = {p.key: p.value for p in m.metadata_props}
    del props["weight_bits"]
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(out))
    monkeypatch.setattr(inference, "int8_cpu", lambda: True)
    monkeypatch.setattr(inference, "int8_dot_cpu", lambda: False)
    with pytest.raises(ValueError, match="saturate.*deepmask quantize"):
        Proposer(model, InferenceConfig(scale_min=0, scale_max=0, runtime="onnx-int8"), "cpu", int8_trunk=out)
    with pytest.warns(UserWarning, match="saturate"):
        assert Proposer(model, InferenceConfig(scale_min=0, scale_max=0), "cpu", int8_trunk=out).runtime == "torch"
    monkeypatch.setattr(inference, "int8_dot_cpu", lambda: True)  # exact with VNNI: run
    assert Proposer(model, InferenceConfig(scale_min=0, scale_max=0), "cpu", int8_trunk=out).runtime == "onnx-int8"


def test_keep_float_leaves_the_named_layers_in_float32(tiny_weights, tmp_path):
    """``quantize --keep-float PREFIX``: the convolutions of those layers read
    their float weights directly (no int8 weight, no quantized input); the
    others are quantized; an unknown prefix is a clear error."""
    import onnx

    from deepmask_cli.export.quantize import QuantizeError, quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    photos = sorted(_photos(tmp_path / "photos").iterdir())
    out = quantize_trunk(model, photos, tmp_path / "t.onnx", limit=1, keep_float=["score_head."])
    m = onnx.load(str(out))
    made = {n.output[0]: n.op_type for n in m.graph.node}
    convs = {n.input[2] if len(n.input) > 2 else n.name: n for n in m.graph.node if n.op_type == "Conv"}
    head = [n for b, n in convs.items() if b.startswith("score_head.")]
    trunk = [n for b, n in convs.items() if b.startswith("trunk.")]
    assert head and trunk
    assert all(made.get(n.input[1]) != "DequantizeLinear" for n in head)  # float weights
    assert all(made.get(n.input[1]) == "DequantizeLinear" for n in trunk)  # int8 weights
    assert json.loads({p.key: p.value for p in m.metadata_props}["float_layers"]) == ["score_head."]
    with pytest.raises(QuantizeError, match="no convolution"):
        quantize_trunk(model, photos, tmp_path / "u.onnx", limit=1, keep_float=["trunk.nothing."])


def _activation_scales(path) -> dict[str, float]:
    m = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n.input[0]: float(init[n.input[1]]) for n in m.graph.node
            if n.op_type == "QuantizeLinear" and init[n.input[1]].ndim == 0}


@pytest.mark.slow
def test_calibration_method_is_chosen_and_recorded(tiny_weights, tmp_path):
    """``quantize --calibration minmax`` covers every activation value seen,
    so no range is narrower than percentile calibration's (which clips the
    outliers) and most are wider; the method is in the file's metadata; an
    unknown method is a one-line error."""
    from deepmask_cli.export.quantize import QuantizeError, quantize_trunk

    model, _, _ = load_weights(tiny_weights)
    photos = _photos(tmp_path / "photos")
    r = CliRunner().invoke(main, ["quantize", str(photos), "--weights", str(tiny_weights), "--limit", "2",
                                  "--calibration", "minmax", "-o", str(tmp_path / "mm.onnx")])
    assert r.exit_code == 0, r.output
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "mm.onnx")).metadata_props}
    assert json.loads(props["calibration"])["method"] == "minmax"
    pc = quantize_trunk(model, sorted(photos.iterdir()), tmp_path / "pc.onnx", limit=2, method="percentile")
    assert json.loads({p.key: p.value for p in onnx.load(str(pc)).metadata_props}["calibration"])["method"] == "percentile"
    mm, pc = _activation_scales(tmp_path / "mm.onnx"), _activation_scales(pc)
    assert mm.keys() == pc.keys() and len(mm) > 5
    assert all(mm[k] >= pc[k] * (1 - 1e-5) for k in mm)
    assert sum(mm[k] > pc[k] * 1.01 for k in mm) >= len(mm) // 2
    with pytest.raises(QuantizeError, match="calibration method 'kl'"):
        quantize_trunk(model, sorted(photos.iterdir()), tmp_path / "u.onnx", limit=1, method="kl")
    r = CliRunner().invoke(main, ["quantize", str(photos), "--weights", str(tiny_weights), "--calibration", "kl"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_int8_trunk_of_weights_with_a_refinement_returns_the_maps_it_reads(tiny_config, tmp_path):
    """quantize of weights with a SharpMask refinement: the int8 network
    returns the trunk's finer maps too, and the refinement reads them rather
    than running the trunk's first stages again over every canvas. An int8
    trunk quantized before the weights had a refinement (the same trunk and
    score head) still serves: the refinement computes them in torch."""
    import dataclasses

    from deepmask_cli.export.quantize import quantize_trunk
    from deepmask_cli.inference.pyramid import image_to_tensor
    from synth import tiny_model, trunk_levels_calls

    model = tiny_model(dataclasses.replace(tiny_config, refine=(8, 4)))  # modules at strides 16 and 8
    plain = DeepMask(tiny_config)
    plain.load_state_dict(model.state_dict(), strict=False)
    photos = sorted(_photos(tmp_path / "photos").iterdir())
    new = quantize_trunk(model, photos, tmp_path / "new.onnx", limit=2)
    old = quantize_trunk(plain, photos, tmp_path / "old.onnx", limit=2)
    assert [o.name for o in onnx.load(str(new)).graph.output] == ["fmap", "scores", "stride8"]
    assert [o.name for o in onnx.load(str(old)).graph.output] == ["fmap", "scores"]
    img = image_to_tensor(np.asarray(Image.open(photos[2])))
    cfg = InferenceConfig(scale_min=-0.5, scale_max=0, scale_step=0.5, precision="fp32", max_proposals=20,
                          refine_topk=5)
    reference = Proposer(model, cfg, "cpu").dense_pass([img])
    got = {}
    for name, int8 in (("new", new), ("old", old)):
        proposer = Proposer(model, cfg.replace(runtime="onnx-int8"), "cpu", int8_trunk=int8)
        calls = trunk_levels_calls(proposer)
        pyramid = proposer.dense_pass([img])
        got[name] = proposer.proposals_from_levels(pyramid, [tuple(img.shape[1:])])[0]
        assert len(got[name]) == 20
        if name == "new":
            assert calls == [] and all(lv.canvas is None for lv in pyramid)
            for lv, ref in zip(pyramid, reference):  # the int8 maps follow the float ones
                a, b = lv.finer[8].float().flatten(), ref.finer[8].flatten()
                assert lv.finer[8].shape == ref.finer[8].shape and torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98
        else:
            assert all(lv.finer is None for lv in pyramid) and calls and set(calls) == {8}
    torch.testing.assert_close(got["new"].scores, got["old"].scores, atol=0.02, rtol=0)
