"""Training: the sampler's geometry, targets, the loss going down, resume, DDP, export."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deepmask_cli.core.config import ConfigError, SamplerConfig, TrainConfig
from deepmask_cli.training.data import DataError, load_coco, resolve_coco
from deepmask_cli.training.patches import PatchDataset
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.training.loop import TrainData, train
from deepmask_cli.training.objective import deepmask_loss, lr_factor
from synth import free_port

from conftest import TINY


def _records(root):
    return load_coco(root / "instances.json", root / "images")[0]


def test_resolve_both_layouts(tmp_path, synth_coco):
    assert resolve_coco(synth_coco) == (synth_coco / "instances.json", synth_coco / "images")
    (tmp_path / "c" / "annotations").mkdir(parents=True)
    (tmp_path / "c" / "annotations" / "instances_val2017.json").write_text("{}")
    assert resolve_coco(tmp_path / "c", split="val") == (tmp_path / "c/annotations/instances_val2017.json", tmp_path / "c/val2017")
    with pytest.raises(DataError, match="found neither"):
        resolve_coco(tmp_path)


def test_sampler_positives_and_negatives_geometry(synth_coco):
    recs = _records(synth_coco)
    cfg = SamplerConfig()
    ds = PatchDataset(recs, TINY, cfg, seed=3)
    n_pos = 0
    for i in range(600):
        s = ds.spec(i)
        rec = recs[s.image]
        log2s = math.log2(s.scale)
        if s.label > 0:
            n_pos += 1
            inst = rec.instances[s.instance]
            assert inst.usable
            x, y, w, h = inst.bbox
            assert math.hypot(x + w / 2 - s.cx, y + h / 2 - s.cy) * s.scale <= cfg.pos_shift + 1e-6
            assert abs(log2s - math.log2(TINY.object_size / max(w, h))) <= cfg.pos_scale + 1e-9
        else:
            for inst in rec.instances:  # crowd regions included
                x, y, w, h = inst.bbox
                far = math.hypot(x + w / 2 - s.cx, y + h / 2 - s.cy) * s.scale >= cfg.neg_shift
                off = abs(log2s - math.log2(TINY.object_size / max(w, h))) >= cfg.neg_scale
                assert far or off
    assert 0.4 < n_pos / 600 < 0.6


def test_targets_align_with_patches_flip_included(synth_coco):
    """The mask target of a positive covers the bright shape in its patch."""
    recs = _records(synth_coco)
    ds = PatchDataset(recs, TINY, SamplerConfig(color_jitter=0.0), seed=1, fill=(0.5, 0.5, 0.5))
    flips = set()
    checked = 0
    for i in range(200):
        s = ds.spec(i)
        if s.label < 0:
            continue
        x, mask, label = ds.render(s)
        assert label == 1 and mask.shape == (16, 16) and x.shape == (3, 64, 64)
        small = torch.nn.functional.avg_pool2d(x[None], 4)[0].mean(0)  # 16x16 brightness
        bright = small > 0.42  # the shapes are bright (>120/255) on dark noise
        inter = (bright & (mask > 0)).sum().item()
        assert inter / max(mask.sum().item(), 1) > 0.7
        flips.add(s.flip)
        checked += 1
    assert checked > 50 and flips == {True, False}


def test_context_widens_the_patch_around_the_same_window(synth_coco):
    """``context``: the refinement's patches hold the same window at their
    centre with that many pixels of the image around it; the mask target is
    the window's."""
    recs = _records(synth_coco)
    plain = PatchDataset(recs, TINY, SamplerConfig(color_jitter=0.0), seed=1, fill=(0.5, 0.5, 0.5))
    wide = PatchDataset(recs, TINY, SamplerConfig(color_jitter=0.0), seed=1, fill=(0.5, 0.5, 0.5), context=16)
    for i in range(20):
        s = plain.spec(i)
        x, mask, label = plain.render(s)
        xw, maskw, labelw = wide.render(s)
        assert xw.shape == (3, 96, 96) and torch.equal(mask, maskw) and label == labelw
        assert (xw[:, 16:80, 16:80] - x).abs().mean() < 0.02
    with pytest.raises(ConfigError, match="multiple"):
        TrainConfig(refine_context=24)


def test_loss_is_the_papers():
    m = torch.zeros(2, 4, 4)
    s = torch.zeros(2)
    t = torch.ones(2, 4, 4)
    y = torch.tensor([1.0, -1.0])
    total, mask_part, score_part = deepmask_loss(m, s, t, y, 1 / 32)
    assert mask_part.item() == pytest.approx(math.log(2))  # the positive only, mean over pixels
    assert score_part.item() == pytest.approx(2 * math.log(2))
    assert total.item() == pytest.approx(math.log(2) + 2 * math.log(2) / 32)


def _tiny_train_config(**kw):
    base = TrainConfig(steps=30, batch_size=8, lr=0.01, workers=0, checkpoint_every=10, val_every=10, val_batches=2, seed=5)
    return dataclasses.replace(base, **kw)


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(synth_coco, tmp_path):
    recs = _records(synth_coco)
    ds = PatchDataset(recs, TINY, SamplerConfig(), seed=99, fill=(0.5, 0.5, 0.5), augment=False)
    batch = [torch.stack(z) for z in zip(*[ds[i] for i in range(32)])]

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            return deepmask_loss(*model(batch[0]), batch[1], batch[2], 1 / 32)[0].item()

    torch.manual_seed(5)
    before = loss_of(DeepMask(TINY))
    weights = train(TrainData(synth_coco / "instances.json", synth_coco / "images"), tmp_path / "run",
                    model_config=TINY, config=_tiny_train_config(steps=60, lr=0.3), pretrained=False)
    from deepmask_cli.modeling.weights import load_weights

    after = loss_of(load_weights(weights)[0])
    assert after < 0.8 * before


def _cli_train(root, run, steps, extra=()):
    cfg = run.parent / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    return [sys.executable, "-m", "deepmask_cli", "train", str(root), "-o", str(run), "--model-config", str(cfg),
            "--no-pretrained", "--steps", str(steps), "--batch-size", "8", "--lr", "0.01", "--workers", "0",
            "--checkpoint-every", "5", "--seed", "7", "--device", "cpu", "--train-trunk", "-q",
            *extra]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(synth_coco, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_cli_train(synth_coco, full, 40), check=True, env=env, timeout=300)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cli_train(synth_coco, cut, 40), env=env)
    deadline = time.time() + 240
    while not (cut / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(cut / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 40, "the run should be killed part-way"
    subprocess.run(_cli_train(synth_coco, cut, 40, ["--resume"]), check=True, env=env, timeout=300)
    a = load_file(str(full / "weights" / "model.safetensors"))
    b = load_file(str(cut / "weights" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.slow
def test_two_process_gloo_ddp(synth_coco, tmp_path):
    run = tmp_path / "ddp"
    cmd = _cli_train(synth_coco, run, 6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), *cmd[1:]]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "weights" / "model.safetensors").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.mark.slow
def test_two_process_gloo_ddp_refine_stage(synth_coco, tiny_weights, tmp_path):
    """SharpMask's stage under torchrun: DeepMask frozen in every process, the
    refinement trained and exported."""
    from safetensors.torch import load_file

    run = tmp_path / "ddp-refine"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
           "deepmask_cli", "train", str(synth_coco), "-o", str(run), "--refine", "--init", str(tiny_weights), "--steps", "4",
           "--batch-size", "4", "--workers", "0", "--device", "cpu", "-q"]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = load_file(str(tiny_weights / "model.safetensors")), load_file(str(run / "weights" / "model.safetensors"))
    assert all(torch.equal(after[k].to(v.dtype), v) for k, v in before.items())
    assert any(k.startswith("refine_head.") for k in after)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4


def test_cache_features_path_and_export_then_propose(synth_coco, tmp_path):
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    weights = train(TrainData(synth_coco / "instances.json", synth_coco / "images"), tmp_path / "run",
                    model_config=TINY, config=_tiny_train_config(freeze_trunk=True, cache_features=True, steps=12),
                    val_data=TrainData(synth_coco / "instances.json", synth_coco / "images"), pretrained=False)
    assert (tmp_path / "run" / "curves.png").exists()
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and "val" in metrics[9]
    r = CliRunner().invoke(main, ["export", str(tmp_path / "run" / "checkpoint.pt"), "-o", str(tmp_path / "w2"), "--half"])
    assert r.exit_code == 0, r.output
    for w in (weights, tmp_path / "w2"):
        r = CliRunner().invoke(main, ["propose", str(synth_coco / "images"), "-o", str(tmp_path / "p.json"),
                                      "--weights", str(w), "--device", "cpu", "--scales", "-1,0,1", "-q"])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "p.json").read_text())


def test_train_coco_layout_as_the_design_writes_it(synth_coco, tmp_path, monkeypatch):
    """``deepmask train coco/``: no -o, no --val. The run goes to the next
    runs/train-N (never an earlier run's), COCO's val split is used, a CPU
    gets the frozen, cached trunk and says so; --resume picks the last run."""
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    tmp_path = tmp_path / "work"  # (synth_coco is tmp_path/coco)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        shutil.copytree(synth_coco / "images", coco / split)
        (coco / "annotations" / f"instances_{split}.json").write_text((synth_coco / "instances.json").read_text())
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    monkeypatch.chdir(tmp_path)
    args = ["train", "coco/", "--model-config", str(cfg), "--no-pretrained", "--steps", "3", "--batch-size", "4",
            "--workers", "0", "--val-every", "3", "--val-batches", "1", "--device", "cpu", "--cache-scales=-1,0,1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "run folder: runs/train-1" in r.output and "instances_val2017.json" in r.output
    said = " ".join(r.output.split())
    assert "--freeze-trunk --cache-features" in said and "--lr=0.01 --score-weight=0.003125" in said
    assert "--steps" not in said and "--cache-scales" not in said  # given, so not a default
    run1 = tmp_path / "runs" / "train-1"
    assert (run1 / "weights" / "model.safetensors").exists()
    metrics = [json.loads(l) for l in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert "val" in metrics[-1]
    ck = torch.load(run1 / "checkpoint.pt", weights_only=False)
    assert ck["train_config"]["freeze_trunk"] and ck["train_config"]["cache_features"]
    recipe = TrainConfig.CACHED_HEADS_DEFAULTS  # the cached-heads recipe, under what was given
    assert (ck["train_config"]["lr"], ck["train_config"]["score_weight"]) == (recipe["lr"], recipe["score_weight"])
    assert ck["train_config"]["steps"] == 3 and tuple(ck["train_config"]["cache_scales"]) == (-1.0, 0.0, 1.0)
    before = (run1 / "metrics.jsonl").read_text()

    r = CliRunner().invoke(main, args[:-1] + ["--train-trunk"])  # a second run never writes into the first
    assert r.exit_code == 0, r.output
    assert "run folder: runs/train-2" in r.output and "--freeze-trunk" not in r.output
    assert (run1 / "metrics.jsonl").read_text() == before
    trained_trunk = torch.load(tmp_path / "runs/train-2/checkpoint.pt", weights_only=False)["train_config"]
    assert not trained_trunk["freeze_trunk"] and trained_trunk["lr"] == TrainConfig().lr  # the official recipe

    r = CliRunner().invoke(main, args[:-1] + ["--train-trunk", "--resume", "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert "run folder: runs/train-2" in r.output and not (tmp_path / "runs/train-3").exists()
    assert torch.load(tmp_path / "runs/train-2/checkpoint.pt", weights_only=False)["step"] == 5


def test_resume_without_a_run_is_a_one_line_error(synth_coco, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["train", str(synth_coco), "--resume", "--device", "cpu"])
    assert r.exit_code == 2 and "no runs/train-N to resume" in r.output


@pytest.mark.parametrize("content,message", [
    ("not json", "not JSON"),
    ('{"images": 3}', "not a COCO instances file"),
    ('{"images": [], "annotations": []}', "no usable object"),
])
def test_bad_annotation_files_are_clear_errors(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_coco(tmp_path / "instances.json", tmp_path / "images")


def test_feature_cache_file_is_reused_and_gives_the_same_run(synth_coco, tmp_path):
    """A run with --cache-file saves the maps; a second run loads them (no
    trunk pass) and trains to the same weights as a run without the file."""
    from deepmask_cli.training import featcache

    data = TrainData(synth_coco / "instances.json", synth_coco / "images")
    cfg = _tiny_train_config(freeze_trunk=True, cache_features=True, steps=4, feature_dropout=0.2,
                             cache_file=str(tmp_path / "maps.pt"))
    events = []
    train(data, tmp_path / "a", model_config=TINY, config=cfg, pretrained=False,
          on_event=lambda k, i: events.append((k, i)))
    assert (tmp_path / "maps.pt").exists()
    assert [i["loaded"] for k, i in events if k == "cache_done"] == [False]

    read = featcache.record_image  # what a cache build reads each image with
    featcache.record_image = lambda *a, **k: pytest.fail("the saved cache was not reused")
    try:
        events.clear()
        train(data, tmp_path / "b", model_config=TINY, config=cfg, pretrained=False,
              on_event=lambda k, i: events.append((k, i)))
    finally:
        featcache.record_image = read
    assert [i["loaded"] for k, i in events if k == "cache_done"] == [True]
    a = load_file(tmp_path / "a" / "weights" / "model.safetensors")
    b = load_file(tmp_path / "b" / "weights" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # different scales: the file does not match and is rebuilt, not misused
    events.clear()
    train(data, tmp_path / "c", model_config=TINY, pretrained=False, on_event=lambda k, i: events.append((k, i)),
          config=dataclasses.replace(cfg, cache_scales=(-1.0, 0.0, 1.0)))
    assert [i["loaded"] for k, i in events if k == "cache_done"] == [False]


def test_feature_dropout_needs_cached_features(synth_coco, tmp_path):
    from deepmask_cli.training.runs import TrainError

    with pytest.raises(TrainError, match="--cache-features"):
        train(TrainData(synth_coco / "instances.json", synth_coco / "images"), tmp_path / "r", model_config=TINY,
              config=_tiny_train_config(feature_dropout=0.2), pretrained=False)


def test_resume_with_other_settings_says_which_it_keeps(synth_coco, tmp_path):
    """--resume continues with the settings the run was started with; the
    ones given differently are named in a warning (not silently dropped),
    and a resume with the same settings says nothing."""
    import warnings

    data = TrainData(synth_coco / "instances.json", synth_coco / "images")
    cfg = _tiny_train_config(steps=2)
    train(data, tmp_path / "run", model_config=TINY, config=cfg, pretrained=False)
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        train(data, tmp_path / "run", model_config=TINY, config=dataclasses.replace(cfg, steps=3), pretrained=False,
              resume=True)
    assert not [w for w in same if "--resume" in str(w.message)]
    other = dataclasses.replace(cfg, steps=4, lr=cfg.lr * 2, sampler=dataclasses.replace(cfg.sampler, neg_scale=0.5))
    with pytest.warns(UserWarning, match="--resume") as got:
        train(data, tmp_path / "run", model_config=TINY, config=other, pretrained=False, resume=True)
    msg = str(got[0].message)
    assert f"lr {cfg.lr} (not {cfg.lr * 2})" in msg and "sampler.neg_scale 1.0 (not 0.5)" in msg
    assert "steps" not in msg


def test_lr_schedule_steps_down_at_the_milestones():
    cfg = TrainConfig(steps=600, lr_milestones=(1 / 6, 0.4), lr_factors=(0.5, 0.1))
    assert [lr_factor(t, cfg) for t in (0, 99, 100, 239, 240, 599)] == [1, 1, 0.5, 0.5, 0.1, 0.1]


def test_validation_reports_the_share_of_live_score_units():
    """score_live: the share of the score head's first-layer ReLUs that some
    validation patch turns on; silenced units (the failure a too-high lr
    causes) count as dead."""
    from deepmask_cli.training.validation import patch_metrics

    torch.manual_seed(0)
    model = DeepMask(TINY)
    p = TINY.patch_size
    batches = [(torch.rand(4, 3, p, p), torch.zeros(4, TINY.mask_size, TINY.mask_size), torch.tensor([1.0, -1, -1, 1]))]
    assert 0 < patch_metrics(model, batches, torch.device("cpu"))["score_live"] <= 1
    with torch.no_grad():
        model.score_head.fc1.bias[: model.score_head.fc1.out_features // 4] = -1e6
    live = patch_metrics(model, batches, torch.device("cpu"))["score_live"]
    assert live <= 0.75 + 1e-6
    model.score_head.fc1.bias.data.fill_(-1e6)
    assert patch_metrics(model, batches, torch.device("cpu"))["score_live"] == 0.0


@pytest.mark.slow
def test_refine_stage_trains_only_the_refinement_on_a_frozen_deepmask(synth_coco, tiny_weights, tmp_path):
    """``train --refine --init W``: SharpMask's second stage. The exported
    network is W's, tensor for tensor, plus trained refinement modules; it
    resumes, and its weights load and propose."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from deepmask_cli.cli.main import main
    from deepmask_cli.core.config import SHARPMASK_REFINE
    from deepmask_cli.modeling.weights import load_weights

    run = tmp_path / "refine"
    args = ["train", str(synth_coco), "--val", str(synth_coco), "-o", str(run), "--refine", "--init", str(tiny_weights), "--steps", "4",
            "--batch-size", "4", "--workers", "0", "--val-every", "2", "--val-batches", "1", "--device", "cpu", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    model, _, cfg = load_weights(run / "weights")
    # the dense pass and the scores are W's, and so are the values tuned for them
    assert cfg["inference"] == json.loads((tiny_weights / "config.json").read_text())["inference"] != {}
    assert tuple(cfg["model"]["refine"]) == SHARPMASK_REFINE and model.refine_head.out_size == 4 * TINY.feat_size * 2
    before, after = load_file(str(tiny_weights / "model.safetensors")), load_file(str(run / "weights" / "model.safetensors"))
    assert set(after) - set(before) and all(k.startswith("refine_head.") for k in set(after) - set(before))
    for k, v in before.items():  # DeepMask is frozen
        assert torch.equal(after[k].to(v.dtype), v), k
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    trained = {n for n, p in DeepMask(model.config).named_parameters() if n.startswith("refine_head.")}
    assert len(ck["optimizer"]["state"]) == len(trained)  # momentum for the refinement's tensors only
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["mask_loss"]) for m in metrics) and "val" in metrics[-1]
    r = CliRunner().invoke(main, args[:-1] + ["--resume", "--steps", "6", "-q"])
    assert r.exit_code == 0, r.output
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 6
    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "ft"), "--init", str(run / "weights"),
                                  "--device", "cpu", "--steps", "1"])  # fine-tuning would leave the refinement behind
    assert r.exit_code != 0 and "refinement" in r.output and "Traceback" not in r.output
    full = tmp_path / "full"  # resuming is bit-exact: the same as 6 steps in one go
    i = args.index("-o")
    r = CliRunner().invoke(main, [*args[:i + 1], str(full), *args[i + 2:-1], "--steps", "6", "-q"])
    assert r.exit_code == 0, r.output
    a, b = load_file(str(full / "weights" / "model.safetensors")), load_file(str(run / "weights" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_weights(run / "weights")[2]["inference"] == cfg["inference"]  # kept across the resume
    r = CliRunner().invoke(main, ["propose", str(synth_coco / "images"), "-o", str(tmp_path / "p.json"), "--weights",
                                  str(run / "weights"), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra,message", [
    ([], "add --init"),
    (["--cache-features"], "drop --cache-features"),
])
def test_refine_needs_weights_and_patches(synth_coco, tmp_path, extra, message):
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "r"), "--refine", "--device", "cpu",
                                  *extra, *(["--init", "x"] if extra else [])])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_refine_context_needs_refine(synth_coco, tmp_path):
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "r"), "--refine-context", "32",
                                  "--device", "cpu"])
    assert r.exit_code != 0 and "add --refine" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()


def test_init_fine_tunes_trained_weights(synth_coco, tiny_weights, tmp_path):
    """``train --init W --train-trunk``: W's network (not the default one)
    trained further, trunk and heads, its tuned inference values kept; with
    ``--freeze-trunk`` the trunk stays W's, tensor for tensor. A trunk named
    beside --init, or a SharpMask folder, is refused in one line."""
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main
    from deepmask_cli.modeling.weights import load_weights

    before = load_file(str(tiny_weights / "model.safetensors"))
    common = ["--init", str(tiny_weights), "--steps", "3", "--batch-size", "4", "--workers", "0", "--lr", "0.01",
              "--device", "cpu", "-q"]
    for name, flags in (("all", ["--train-trunk"]), ("heads", ["--freeze-trunk", "--no-cache-features"])):
        run = tmp_path / name
        r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(run), *flags, *common])
        assert r.exit_code == 0, r.output
        model, _, cfg = load_weights(run / "weights")
        assert model.config == load_weights(tiny_weights)[0].config  # W's network, not the default Lite0
        assert cfg["inference"] == json.loads((tiny_weights / "config.json").read_text())["inference"] != {}
        after = load_file(str(run / "weights" / "model.safetensors"))
        assert after.keys() == before.keys()
        changed = {k for k in before if not torch.equal(after[k].to(before[k].dtype), before[k])}
        assert any(not k.startswith("trunk.") for k in changed)  # the heads learn
        assert any(k.startswith("trunk.") for k in changed) == (name == "all"), sorted(changed)
    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "r"), "--trunk", "efficientnet-lite0", *common])
    assert r.exit_code != 0 and "drop --trunk" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "r"), "--init", str(tmp_path / "nothing")])
    assert r.exit_code != 0 and "nothing" in r.output and "Traceback" not in r.output


def test_train_blocks_fine_tunes_the_trunks_last_blocks_on_cached_maps(synth_coco, tmp_path):
    """--train-blocks 2 on cached maps: the trunk's last two blocks learn,
    the rest of the trunk stays as it was, and the exported weights carry
    the new blocks (inference runs them; nothing else changes there)."""
    from deepmask_cli.modeling.model import build_model
    from deepmask_cli.modeling.weights import load_weights

    torch.manual_seed(5)  # train() seeds the same way: the trunk it starts from
    start = build_model(TINY).trunk.state_dict()
    data = TrainData(synth_coco / "instances.json", synth_coco / "images")
    events = []
    weights = train(data, tmp_path / "run", model_config=TINY, pretrained=False, on_event=lambda k, i: events.append((k, i)),
                    config=_tiny_train_config(freeze_trunk=True, cache_features=True, train_blocks=2, steps=6,
                                              cache_scales=(-1.0, 0.0, 1.0), cache_file=str(tmp_path / "maps.pt")))
    trunk = load_weights(weights)[0].trunk.state_dict()
    n = len(build_model(TINY).trunk.blocks)
    tail = tuple(f"blocks.{k}." for k in (n - 2, n - 1))
    moved = {k for k, v in trunk.items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith(tail) for k in moved)
    assert any(k.startswith(f"blocks.{n - 2}.") for k in moved) and any(k.startswith(f"blocks.{n - 1}.") for k in moved)
    meta = torch.load(tmp_path / "maps.pt", weights_only=True)["meta"]
    assert meta["tail"] == 2  # maps of the blocks' input, not reusable as the whole trunk's


@pytest.mark.parametrize("extra,message", [
    (["--train-blocks", "9"], "give 1 to 5"),
    (["--train-blocks", "-1"], "--train-blocks"),
    (["--train-blocks", "1", "--train-trunk"], "add --freeze-trunk"),
])
def test_train_blocks_bad_values_are_one_line_errors(synth_coco, tmp_path, extra, message):
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "r"), "--device", "cpu", "--no-pretrained",
                                  "--steps", "1", "--workers", "0", "-q", *extra])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def _cached_config(**kw):
    return _tiny_train_config(freeze_trunk=True, cache_features=True, cache_scales=(-1.0, 0.0, 1.0), **kw)


def _spy_cache_reads(monkeypatch):
    """The images whose maps the trunk computes (each is read for it)."""
    from deepmask_cli.training import featcache

    computed, real = [], featcache.record_image
    monkeypatch.setattr(featcache, "record_image", lambda rec: computed.append(str(rec.path)) or real(rec))
    return computed


def test_a_run_interrupted_while_caching_resumes_without_recomputing(synth_coco, tmp_path, monkeypatch):
    """Ctrl-C while the maps are being cached: the run folder exists with its
    settings and the maps cached so far; --resume computes only the others
    and ends with the weights of a run that never stopped."""
    from deepmask_cli.training import featcache
    from deepmask_cli.training.featstore import RUN_CACHE_DIR
    from deepmask_cli.training.runs import OPTIONS

    monkeypatch.setattr(featcache, "GROW_START", 1)  # one image cached per step: a step comes before the second
    data, cfg, run = TrainData(synth_coco / "instances.json", synth_coco / "images"), _cached_config(steps=6), tmp_path / "run"
    computed = _spy_cache_reads(monkeypatch)

    def stop_at_second_image(kind, info):
        if kind == "cache" and info["done"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, run, model_config=TINY, config=cfg, pretrained=False, on_event=stop_at_second_image)
    assert (run / OPTIONS).exists() and not (run / "checkpoint.pt").exists()
    assert len(computed) == 2 and len(list((run / RUN_CACHE_DIR).glob("*.pt"))) == 2
    first = list(computed)
    computed.clear()
    events = []
    with pytest.warns(UserWarning, match="lr 0.01 \\(not 0.5\\)"):  # the run's own lr (options.json), not this one
        train(data, run, model_config=TINY, config=dataclasses.replace(cfg, lr=0.5), pretrained=False, resume=True,
              on_event=lambda k, i: events.append((k, i)))
    assert len(computed) == 2 and not set(computed) & set(first)
    assert [i["reused"] for k, i in events if k == "cache_done"] == [2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    computed.clear()
    train(data, tmp_path / "whole", model_config=TINY, config=cfg, pretrained=False)
    a = load_file(run / "weights" / "model.safetensors")
    b = load_file(tmp_path / "whole" / "weights" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_starts_before_every_image_is_cached(synth_coco, tmp_path, monkeypatch):
    """The maps are cached as the steps first sample their images: the first
    step comes after GROW_START images' maps, not all of them."""
    from deepmask_cli.training import featcache

    monkeypatch.setattr(featcache, "GROW_START", 2)
    events = []
    train(TrainData(synth_coco / "instances.json", synth_coco / "images"), tmp_path / "run", model_config=TINY,
          config=_cached_config(steps=4), pretrained=False, on_event=lambda k, i: events.append((k, i)))
    order = [(k, i.get("done", i.get("step"))) for k, i in events if k in ("cache", "step", "cache_done")]
    assert order[:4] == [("cache", 1), ("cache", 2), ("step", 1), ("cache", 3)]
    assert order.index(("cache_done", None)) < order.index(("step", 3))


def test_val_every_without_validation_data_is_an_error_and_curves_come_with_validation(synth_coco, tmp_path):
    """A plain instances.json + images/ folder has no val split: --val-every
    alone says how to give one (no run folder made); with --val, each
    validation redraws curves.png."""
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    args = ["train", str(synth_coco), "-o", str(tmp_path / "run"), "--model-config", str(cfg), "--no-pretrained",
            "--steps", "2", "--batch-size", "4", "--val-every", "2", "--val-batches", "1", "--device", "cpu",
            "--cache-scales=-1,0,1", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--val DIR" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()
    r = CliRunner().invoke(main, args + ["--val", str(synth_coco)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "curves.png").exists()
