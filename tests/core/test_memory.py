"""The memory policy of long propose runs (deepmask_cli.core.memory)."""

from deepmask_cli.core import memory as heap


def test_memory_cap_trims_only_past_its_slack(monkeypatch):
    rss = iter([1000, 1100, 1000 + 256, 1000 + 257, 1200, 2000])
    calls = []
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(rss) * 2**20)
    monkeypatch.setattr(heap, "_malloc_trim", lambda: (lambda pad: calls.append(pad) or 1))
    cap = heap.MemoryCap(slack_mb=256)
    assert [cap() for _ in range(6)] == [False, False, False, True, False, True]
    assert cap.base == 1000 * 2**20 and cap.releases == 2 and calls == [0, 0]


def test_memory_cap_does_nothing_without_glibc_or_proc(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    cap = heap.MemoryCap()
    assert not cap() and not cap() and cap.releases == 0
    monkeypatch.undo()
    monkeypatch.setattr(heap, "resident_bytes", lambda: None)
    assert not heap.MemoryCap()()


def test_map_large_buffers_sets_glibcs_mmap_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda: (lambda param, value: calls.append((param, value)) or 1))
    assert heap.map_large_buffers(8)
    assert calls == [(-3, 8 * 2**20)]  # M_MMAP_THRESHOLD in malloc.h
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert not heap.map_large_buffers()


def test_only_the_torch_runtime_on_a_cpu_maps_large_buffers(monkeypatch, tiny_weights, synth_coco, tmp_path):
    """torch's CPU tensors come from malloc; ONNX Runtime's from its own
    arena. Once large buffers are mapped, the ceiling is the lower one."""
    from deepmask_cli.pipeline import propose
    from deepmask_cli.pipeline.loading import load_proposer
    from deepmask_cli.pipeline.propose import run_propose

    calls, slacks = [], []
    monkeypatch.setattr(propose, "map_large_buffers", lambda: calls.append(1) or True)
    monkeypatch.setattr(propose, "MemoryCap", lambda slack: slacks.append(slack) or heap.MemoryCap(slack))
    proposer = load_proposer(tiny_weights, device="cpu")
    assert proposer.runtime == "torch"
    images = sorted((synth_coco / "images").iterdir())[:1]
    run_propose(images, tmp_path / "a.json", proposer=proposer)
    assert calls == [1] and slacks == [heap.MAPPED_SLACK_MB]
    run_propose(images, tmp_path / "b.json", proposer=proposer, release_memory=False)
    assert calls == [1] and slacks == [heap.MAPPED_SLACK_MB]
    proposer.runtime = "onnx-int8"  # only read by the policy here: no image is run
    run_propose([], tmp_path / "c.json", proposer=proposer)
    assert calls == [1] and slacks == [heap.MAPPED_SLACK_MB, heap.SLACK_MB]
    # where glibc cannot map them (another C library), the usual ceiling
    monkeypatch.setattr(propose, "map_large_buffers", lambda: False)
    proposer.runtime = "torch"
    run_propose([], tmp_path / "d.json", proposer=proposer)
    assert slacks[-1] == heap.SLACK_MB
