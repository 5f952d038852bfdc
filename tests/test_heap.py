"""The memory policy of long propose runs (deepmask_cli.heap)."""

from deepmask_cli import heap


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
