"""Background prefetch of training batches (issue 20): a thread pulls the next batches from the data
loader's iterator (sampling, on-the-fly encode, masking, the copy to the device) while the training
step runs in the main thread, so the encode overlaps the step instead of running before it.

Torch's CPU kernels release the GIL, so the two threads compute at once. On a CPU the prefetch thread
gets its own small intra-op pool (OpenMP thread counts are per thread: torch.set_num_threads there
leaves the training step's count alone). On a GPU the thread works on a side CUDA stream; a batch is
handed over with an event the training stream waits on (and record_stream, so the caching allocator
does not reuse its memory while the step still reads it).

The batches and their order are those of the wrapped iterator: only when they are computed changes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Iterator

import torch

log = logging.getLogger(__name__)

THREAD_NAME = "vqdna-prefetch"
_DONE = object()


def default_encode_threads(train_threads: int | None = None) -> int:
    """CPU threads for the prefetch thread: a quarter of the training step's (at least 1). The encode
    of a batch costs a small part of a masked-LM step (docs/design.md §2.5: ~15 MFLOP per base)."""
    train_threads = torch.get_num_threads() if train_threads is None else train_threads
    return max(1, train_threads // 4)


class Prefetcher(Iterator):
    """Iterates `source` `depth` batches ahead in a daemon thread ("vqdna-prefetch").

    device: where the batches end up; a CUDA device runs the thread on a side stream of it.
    threads: torch intra-op threads of the prefetch thread on a CPU (None: default_encode_threads()).
    An exception in the thread is raised by the next __next__. `produced` counts the batches the
    thread made; `thread_name` is the name of the thread that made them (what ran, for logs and tests).
    """

    def __init__(self, source: Iterator, depth: int = 1, device: str | torch.device | None = None,
                 threads: int | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.source = source
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:  # the thread sets it as its current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.threads = default_encode_threads() if threads is None else int(threads)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.produced = 0
        self.thread_name = THREAD_NAME
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.stream is None:
                torch.set_num_threads(self.threads)  # this thread's pool only (see the module docstring)
            else:
                torch.cuda.set_device(self.device)  # the current device is per thread too
            while not self._stop.is_set():
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    try:
                        batch = next(self.source)
                    except StopIteration:
                        break
                    event = None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                self.produced += 1
                if not self._put((batch, event, None)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put((None, None, exc))
            return
        self._put((_DONE, None, None))

    def _put(self, item) -> bool:
        """Blocks while the queue is full; False once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self):
        if self._thread is None:
            raise StopIteration
        batch, event, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        if batch is _DONE:
            self.close()
            raise StopIteration
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            _record_stream(batch, stream)
        return batch

    def close(self) -> None:
        """Stops the thread (after the batch it is computing) and drops what it prefetched."""
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None


def _record_stream(batch, stream) -> None:
    """Marks every CUDA tensor of `batch` (nested dicts/lists) as used on `stream`."""
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record_stream(v, stream)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _record_stream(v, stream)


def prefetching_trainer(trainer_cls, device=None, threads: int | None = None):
    """A subclass of the transformers Trainer class `trainer_cls` whose training loop takes its batches
    from a Prefetcher over each epoch's data-loader iterator (the loader, its sampler, the resume skip
    and the batches are the Trainer's own). `trainer.prefetchers` lists the Prefetchers that ran."""

    class PrefetchingTrainer(trainer_cls):
        def get_batch_samples(self, epoch_iterator, num_batches, device_):
            current = getattr(self, "_prefetcher", None)
            if current is None or current.source is not epoch_iterator:
                if current is not None:
                    current.close()
                current = self._prefetcher = Prefetcher(epoch_iterator, device=device, threads=threads)
                self.prefetchers = [*getattr(self, "prefetchers", []), current]
                log.info("batches prefetched by thread %s (%s, %d CPU threads there)", THREAD_NAME, current.device,
                         current.threads)
            return super().get_batch_samples(current, num_batches, device_)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                if getattr(self, "_prefetcher", None) is not None:
                    self._prefetcher.close()
                    self._prefetcher = None

    PrefetchingTrainer.__name__ = PrefetchingTrainer.__qualname__ = f"Prefetching{trainer_cls.__name__}"
    return PrefetchingTrainer

