"""vqdna.train.prefetch: the Prefetcher yields the source's batches in order, made ahead of time in its
own thread (with its own torch thread count), passes on the source's errors and stops when closed."""

import threading
import time

import pytest
import torch

from vqdna.train.prefetch import THREAD_NAME, Prefetcher, default_encode_threads


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_same_batches_made_ahead_in_its_thread():
    made = []

    def source():
        for k in range(5):
            made.append((k, threading.current_thread().name, torch.get_num_threads()))
            yield torch.full((2,), k)

    main_threads = torch.get_num_threads()
    p = Prefetcher(source(), depth=1, threads=1)
    assert torch.equal(next(p), torch.full((2,), 0))
    # while the consumer "trains" (does not ask), the next batches are made: one queued, one waiting to be
    _wait_for(lambda: p.produced == 3)
    assert [k for k, _, _ in made] == [0, 1, 2]
    assert [int(b[0]) for b in p] == [1, 2, 3, 4]  # in order, then StopIteration
    assert {(name, n) for _, name, n in made} == {(THREAD_NAME, 1)}
    assert torch.get_num_threads() == main_threads  # the prefetch thread's count is its own
    with pytest.raises(StopIteration):
        next(p)


def test_errors_reach_the_consumer():
    def source():
        yield 1
        raise ValueError("bad record in genome.fa")

    p = Prefetcher(source())
    assert next(p) == 1
    with pytest.raises(ValueError, match="bad record in genome.fa"):
        next(p)


def test_close_stops_the_thread():
    def endless():
        k = 0
        while True:
            k += 1
            yield k

    p = Prefetcher(endless(), depth=2)
    assert next(p) == 1
    thread = p._thread
    p.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(p)


def test_default_encode_threads():
    assert [default_encode_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 1, 4]
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter(()), depth=0)
