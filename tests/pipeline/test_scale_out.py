"""Large jobs: shards merge to the unsharded result, worker processes and the
GPU-sized paste chunks give the same proposals as the plain path, and the
results writer keeps no records in memory."""

import json

import pytest
from click.testing import CliRunner

from deepmask_cli.cli.main import main
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import run_propose, shard_slice
from deepmask_cli.formats.results import MergeError, ResultsWriter, merge_results, records
from synth import free_port


def _propose(args, tiny_weights, tmp_path, name):
    out = tmp_path / name
    r = CliRunner().invoke(main, ["propose", *args, "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_shards_merge_to_the_unsharded_result(synth_coco, tiny_weights, tmp_path):
    images = str(synth_coco / "images")
    whole = _propose([images], tiny_weights, tmp_path, "whole.json")
    parts = [_propose([images, "--shard", f"{i}/3"], tiny_weights, tmp_path, f"part{i}.json") for i in range(3)]
    # every part holds its own contiguous block of the photos, and none is empty
    blocks = [[rec["image_id"] for rec in json.loads(p.read_text())] for p in parts]
    assert all(blocks) and [min(b) for b in blocks] == sorted(min(b) for b in blocks)
    assert all(max(a) < min(b) for a, b in zip(blocks, blocks[1:]))
    r = CliRunner().invoke(main, ["merge", *map(str, parts), "-o", str(tmp_path / "merged.json")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged.json").read_text() == whole.read_text()
    # the same also with --gt ids
    gt = ["--gt", str(synth_coco / "instances.json")]
    whole = _propose([images, *gt], tiny_weights, tmp_path, "whole-gt.json")
    parts = [_propose([images, *gt, "--shard", f"{i}/2"], tiny_weights, tmp_path, f"gpart{i}.json") for i in range(2)]
    merge_results(parts, tmp_path / "merged-gt.json")
    assert (tmp_path / "merged-gt.json").read_text() == whole.read_text()


def test_shard_blocks_cover_the_inputs_once():
    for count in (0, 1, 5, 17):
        for n in (1, 2, 3, 8):
            got = [i for k in range(n) for i in shard_slice(count, (k, n))]
            assert got == list(range(count))


def test_merge_refuses_overlapping_or_foreign_parts(synth_coco, tiny_weights, tmp_path):
    a = _propose([str(synth_coco / "images")], tiny_weights, tmp_path, "a.json")
    with pytest.raises(MergeError, match="also in"):
        merge_results([a, a], tmp_path / "m.json")
    (tmp_path / "x.json").write_text('{"images": []}')
    r = CliRunner().invoke(main, ["merge", str(a), str(tmp_path / "x.json"), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "x.json" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("bad", ["3/3", "a/b", "1"])
def test_bad_shard_is_a_one_line_error(synth_coco, tiny_weights, tmp_path, bad):
    r = CliRunner().invoke(main, ["propose", str(synth_coco / "images"), "-o", str(tmp_path / "p.json"),
                                  "--weights", str(tiny_weights), "--shard", bad])
    assert r.exit_code == 2 and "--shard" in r.output and "Traceback" not in r.output


def test_fp16_on_a_cpu_is_a_clear_error(synth_coco, tiny_weights, tmp_path):
    r = CliRunner().invoke(main, ["propose", str(synth_coco / "images"), "-o", str(tmp_path / "p.json"),
                                  "--weights", str(tiny_weights), "--device", "cpu", "--precision", "fp16"])
    assert r.exit_code == 2 and "fp16 needs a GPU" in r.output


@pytest.mark.slow
def test_worker_processes_write_the_same_file(synth_coco, tiny_weights, tmp_path):
    proposer = load_proposer(tiny_weights, device="cpu")
    run_propose([synth_coco / "images"], tmp_path / "plain.json", proposer=proposer, batch_size=3)
    run_propose([synth_coco / "images"], tmp_path / "pool.json", proposer=proposer, workers=2, batch_size=3)
    assert (tmp_path / "pool.json").read_text() == (tmp_path / "plain.json").read_text()


def test_paste_chunk_size_does_not_change_proposals(synth_coco, tiny_weights):
    from PIL import Image

    image = Image.open(next((synth_coco / "images").glob("*.jpg")))
    outs = []
    for chunk in (1, 7, 1024):
        p = load_proposer(tiny_weights, device="cpu", overrides={"paste_chunk": chunk})
        outs.append(records(p(image, rle=True), image_id=1, file_name="x"))
        full = p(image)  # whole masks, through the other paste path
        assert [r["segmentation"]["counts"] for r in outs[-1]] == [r["counts"] for r in full.to_rles()]
    assert outs[0] == outs[1] == outs[2]


def test_writer_streams_and_keeps_only_offsets(tmp_path):
    w = ResultsWriter(tmp_path / "r.json")
    recs = {f"k{i}": [{"image_id": i, "score": 1.0 / (i + 1), "segmentation": {"size": [2, 2], "counts": "04"}}]
            for i in range(5)}
    for i, (k, r) in enumerate(recs.items()):
        w.add(k, i, r)
    assert all(isinstance(v, tuple) and len(v) == 2 for v in w._index.values())  # offsets, not records
    w.close(order=[f"k{i}" for i in (4, 3, 2, 1, 0)])
    got = json.loads((tmp_path / "r.json").read_text())
    assert [g["image_id"] for g in got] == [4, 3, 2, 1, 0]
    assert got == [recs[f"k{i}"][0] for i in (4, 3, 2, 1, 0)]


def test_streamed_file_equals_records_made_in_memory(synth_coco, tiny_weights, tmp_path):
    """What propose streams to disk is what a Python user gets in memory from
    the straightforward path (whole masks, encoded by pycocotools)."""
    from PIL import Image

    proposer = load_proposer(tiny_weights, device="cpu")
    images = sorted((synth_coco / "images").glob("*.jpg"))
    run_propose(images, tmp_path / "s.json", proposer=proposer)
    expected = []
    for n, path in enumerate(images):
        props = proposer(Image.open(path).convert("RGB"))  # masks, not runs
        assert props.masks is not None
        expected += records(props, image_id=n + 1, file_name=str(path))
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(expected))


def test_runtime_option_through_the_cli(synth_coco, tiny_weights, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    images = str(synth_coco / "images")
    a = _propose([images, "--runtime", "onnx"], tiny_weights, tmp_path, "onnx.json")
    b = _propose([images], tiny_weights, tmp_path, "torch.json")
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert len(ra) == len(rb) and {r["image_id"] for r in ra} == {r["image_id"] for r in rb}
    # without ONNX Runtime (or onnx, to export the trunk) installed: one line
    # that says what to install
    import builtins
    import importlib.util

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    r = CliRunner().invoke(main, ["propose", images, "-o", str(tmp_path / "x.json"), "--weights", str(tiny_weights),
                                  "--device", "cpu", "--runtime", "onnx"])
    assert r.exit_code == 2 and "pip install onnxruntime" in r.output and "Traceback" not in r.output
    monkeypatch.setattr(builtins, "__import__", real_import)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real_find_spec(name, *a))
    r = CliRunner().invoke(main, ["propose", images, "-o", str(tmp_path / "y.json"), "--weights", str(tiny_weights),
                                  "--device", "cpu", "--runtime", "onnx"])
    assert r.exit_code == 2 and "deepmask[onnx]" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_propose_under_torchrun_writes_what_one_process_writes(synth_coco, tiny_weights, tmp_path):
    """torchrun: each rank proposes for its block of the inputs, rank 0
    joins the parts after a barrier; the file is byte for byte the
    single-process one, and no part is left behind. --resume continues each
    rank's own part."""
    import os
    import subprocess
    import sys

    images = str(synth_coco / "images")
    out, whole = tmp_path / "launched.json", tmp_path / "whole.json"
    args = ["-m", "deepmask_cli", "propose", images, "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread in both runs: the same float rounding
    r = subprocess.run([sys.executable, *args, "-o", str(whole)], env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), *args,
           "-o", str(out)]
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:3000]
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("launched")) == ["launched.json"]
    # --resume keeps a part its rank finished before the launch died (here
    # rank 1's, written empty so that keeping it shows), and redoes the rest
    from deepmask_cli.core.launch import Launch
    from deepmask_cli.pipeline.launch import rank_part

    rank_part(out, Launch(1, 2, 1)).write_text("[]")
    out.unlink()
    r = subprocess.run(cmd + ["--resume"], env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    files = {rec["file_name"] for rec in json.loads(out.read_text())}
    assert files == {rec["file_name"] for rec in json.loads(whole.read_text())[:1]} | files and len(files) == 2
    assert not rank_part(out, Launch(1, 2, 1)).exists()
    r = subprocess.run(cmd + ["--shard", "0/2"], env=env, timeout=300, capture_output=True, text=True)
    # each rank's one-line error (torchrun then prints its own traceback of the launch)
    assert r.returncode != 0 and "error: --shard is set by torchrun" in r.stderr and "deepmask_cli/" not in r.stderr


def test_torchrun_launch_reads_torchruns_variables():
    from deepmask_cli.core.launch import Launch, LaunchError, torchrun_launch

    assert torchrun_launch({}) is None and torchrun_launch({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert torchrun_launch({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(LaunchError, match="integers"):
        torchrun_launch({"WORLD_SIZE": "two"})
