"""Decompositions beside the walk (pipeline.overlap): the route a GPU takes, run on the CPU
with the device's synchronisation stood in for."""
import threading

import pytest
import torch
from conftest import structured_tiny

from rankwise import CompressConfig, compress_
from rankwise.cut.compress import Execution
from rankwise.pipeline.overlap import Beside, Inline, for_device
from rankwise.pipeline.placement import Placement


class Recorded(Beside):
    """Beside on the CPU, counting the device synchronisations and the worker's pieces."""

    def __init__(self, device):
        self.synchronized, self.threads = 0, set()
        super().__init__(device, synchronize=self._synchronize)

    def _synchronize(self, device):
        self.synchronized += 1

    def _run(self, work):
        self.threads.add(threading.get_ident())
        return super()._run(work)


class RecordingStream:
    """A stream that records how it is used, in one list shared with the work."""

    def __init__(self, events):
        self.events = events

    def __enter__(self):
        self.events.append("enter")

    def __exit__(self, *exc):
        self.events.append("exit")

    def synchronize(self):
        self.events.append("synchronize")


@pytest.mark.parametrize("fails", [False, True])
def test_the_work_runs_on_its_own_stream_and_is_waited_for_before_it_is_handed_back(fails):
    """On a GPU the worker's kernels run on a stream of its own; the caller may read (and
    free) what they wrote only once they are done, so the worker waits for its stream
    before the result or the failure comes back, failed or not."""
    events = []

    def work():
        events.append("work")
        if fails:
            raise RuntimeError("boom")
        return 1

    overlap = Beside("cpu", synchronize=lambda device: None,
                     stream=lambda device: RecordingStream(events))
    overlap.submit(work, lambda result: events.append("then"))
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            overlap.drain()
    else:
        overlap.drain()
    overlap.close()
    assert events == ["enter", "work", "exit", "synchronize"] + ([] if fails else ["then"])


def test_the_mode_is_chosen_by_the_device():
    assert isinstance(for_device(torch.device("cpu")), Inline)
    assert isinstance(for_device(torch.device("cuda")), Beside)


def test_beside_runs_one_piece_at_a_time_off_the_callers_thread_and_hands_results_in_order():
    overlap, done, running = Recorded("cpu"), [], threading.Event()
    release = threading.Event()

    def slow(k):
        def work():
            running.set()
            assert release.wait(10)
            return k
        return work

    overlap.submit(slow(0), done.append)
    assert running.wait(10) and done == []          # the caller went on while it ran
    release.set()
    for k in (1, 2):
        overlap.submit(lambda k=k: k, done.append)  # waits for the piece before it
        assert done == list(range(k))
    overlap.drain()
    overlap.close()
    assert done == [0, 1, 2] and overlap.synchronized == 3
    assert threading.get_ident() not in overlap.threads


def test_a_failure_beside_is_raised_in_the_caller():
    overlap = Recorded("cpu")

    def failing():
        raise RuntimeError("cusolver failed")

    overlap.submit(failing, lambda result: None)
    with pytest.raises(RuntimeError, match="cusolver failed"):
        overlap.submit(lambda: 1, lambda result: None)
    overlap.close()


@pytest.mark.parametrize("cut", ["oneshot", "anchored"])
def test_decompositions_beside_the_walk_give_the_same_cut(cut, calib):
    """The spectrum allocation's decompositions run beside an onloaded walk (a copying
    placement stands in for the device) and give the very cut they give inline."""
    config = CompressConfig(metric="kfac", ratio=0.4, cut=cut, refine_steps=2)
    inline, beside = structured_tiny("llama"), structured_tiny("llama")
    recorded = []

    def overlap(device):
        recorded.append(Recorded(device))
        return recorded[-1]

    a = compress_(inline, config, calib, progress=False,
                  execution=Execution(placement=Placement("cpu", copy=True),
                                      overlap=lambda device: Inline()))
    b = compress_(beside, config, calib, progress=False,
                  execution=Execution(placement=Placement("cpu", copy=True), overlap=overlap))
    blocks = len(inline.model.layers)
    assert recorded[0].synchronized == blocks and len(recorded[0].threads) == 1
    assert a.ranks == b.ranks and a.decompositions["decompositions"] == \
        b.decompositions["decompositions"]
    with torch.no_grad():
        assert torch.equal(inline(calib).logits, beside(calib).logits)
