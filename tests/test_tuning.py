"""tuning.py: what the tool does to its own process."""

from upcall_capture import tuning


def test_a_worker_gives_its_free_heap_back_once_an_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(tuning.time, "monotonic", lambda: clock[0])
    trimmer = tuning.HeapTrimmer(interval_s=1.0)
    trims = []
    trimmer._trim = lambda pad: trims.append(pad)
    trimmer.tick()
    assert trims == []  # not before the first interval has passed
    clock[0] += 1.0
    trimmer.tick()
    trimmer.tick()
    assert trims == [0]  # once, keeping no pad
    clock[0] += 0.5
    trimmer.tick()
    clock[0] += 0.5
    trimmer.tick()
    assert trims == [0, 0]

