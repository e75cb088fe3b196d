"""One rank's pipeline (docs/design.md §2.5): three stages overlap. A reader thread (FASTA decoding, work units,
packing; on GPU it pins the batch), the compute stage in the calling thread (asynchronous
host-to-device copy, inference under bf16 autocast or in float32, asynchronous device-to-host copy
into pinned memory) and a writer thread (waits for the copy, gathers the segments' codes in piece
order and appends them to the shard)."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from vqdna.data.alphabet import PAD
from vqdna.streaming.packing import Batch, batches
from vqdna.streaming.settings import Settings, TokenizeError
from vqdna.streaming.token_files import ShardWriter, shard_name, shard_problem
from vqdna.streaming.units import planned_units, work_units

__all__ = ["Pipeline", "TokenizeStats"]

_QUEUE_DEPTH = 4  # batches in flight between stages: bounds memory, enough to keep stages busy


@dataclass
class TokenizeStats:
    """What a run did. records/bases: computed by this run (all ranks); encoded_bases: the bases the
    encoder coded (fewer than `bases` when short records repeat within a work unit: each distinct one
    is coded once, copied_records got copies of its codes, docs/design.md §2.5); encoded_positions:
    the batch positions it ran on (bases, halo and pads); seconds: wall time; read_s, compute_s,
    write_s: busy time of each stage (they overlap); usage: per level, code counts [K_l]."""

    records: int = 0
    bases: int = 0
    encoded_bases: int = 0
    encoded_positions: int = 0
    copied_records: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    total_records: int = 0
    total_bases: int = 0
    seconds: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    usage: list = field(default_factory=list)
    redone: list = field(default_factory=list)  # per damaged shard this run re-did: what was wrong


def _estimate_bases(paths: Sequence[str]) -> Optional[int]:
    """Rough base count for the progress bar: plain size, or gzip's stored size (mod 2**32)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic[:2] == b"\x1f\x8b":
                f.seek(-4, os.SEEK_END)
                total += int.from_bytes(f.read(4), "little")
            elif magic == b"\xfd7zXZ\x00":
                return None
            else:
                total += os.path.getsize(path)
    return total


class _Stage(threading.Thread):
    """A pipeline thread that records its exception instead of dying silently."""

    def __init__(self, target, name):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the calling thread)
            self.error = exc


class Pipeline:
    """One rank's reader thread -> compute (the calling thread) -> writer thread, joined by bounded
    queues of items ("unit", index, pieces), ("batch", Batch), ("end", index), ("done",)."""

    def __init__(self, model, inputs, out_dir, settings: Settings, run: dict, stats: TokenizeStats, *, rank, world, resume, verify, progress, plan=None):
        """run: the run's manifest fields (directory.run_manifest): halo, levels, codes dtype. plan:
        the units of every input (units.plan_units), so this rank reads only its own units' bytes;
        None: the units are cut while reading all inputs (one rank)."""
        self.model, self.inputs, self.out_dir, self.settings, self.stats = model, inputs, out_dir, settings, stats
        self.dev, self.dtype, self.rank, self.world, self.resume = settings.torch_device, settings.dtype, rank, world, resume
        self.halo, self.levels, self.codes_dtype = run["halo"], run["levels"], run["dtype"]
        # Pad positions between packed segments: the model's isolation_gap when it has one (the codes
        # are the same as with the halo, docs/design.md §2.5), else the halo (any encoder of radius R).
        self.gap = min(int(getattr(model, "isolation_gap", self.halo)), self.halo)
        self.verify = verify
        self.progress = progress and rank == 0
        self.codebook_sizes = run["codebook_sizes"]
        self.plan = plan
        self.n_units = 0 if plan is None else len(plan)
        self.stop = threading.Event()
        self.in_q: queue.Queue = queue.Queue(_QUEUE_DEPTH)
        self.out_q: queue.Queue = queue.Queue(_QUEUE_DEPTH)

    def _put(self, q: queue.Queue, item, consumer: threading.Thread) -> bool:
        """Put unless the run is stopping or the consumer died; False when the item was not put."""
        while not self.stop.is_set() and consumer.is_alive():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue, producer: Optional[threading.Thread] = None):
        """Next item, or ("stop",) when stopping or the producer ended without sending more."""
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set() or (producer is not None and not producer.is_alive() and q.empty()):
                    return ("stop",)

    def read(self, main: threading.Thread) -> None:
        s, stats = self.settings, self.stats
        if self.plan is None:
            units = work_units(self.inputs, s.shard_bases, s.shard_records, margin=self.halo)
        else:  # only this rank's units, and (resume) only those not kept: no unit is read to be skipped
            t0 = time.perf_counter()
            mine = [k for k in range(self.rank, len(self.plan), self.world)]
            wanted = [k for k in mine if not (self.resume and self._keep(k))]
            stats.shards_skipped += len(mine) - len(wanted)
            stats.read_s += time.perf_counter() - t0
            units = planned_units(self.inputs, self.plan, wanted, s.shard_bases, s.shard_records, margin=self.halo)
        while True:
            t0 = time.perf_counter()
            unit = next(units, None)  # FASTA decoding happens here
            stats.read_s += time.perf_counter() - t0
            if unit is None:
                break
            if self.plan is None:
                self.n_units = unit.index + 1
            if unit.index % self.world != self.rank:
                continue
            if self.plan is None and self.resume and self._keep(unit.index):
                stats.shards_skipped += 1
                continue
            if not self._put(self.in_q, ("unit", unit.index, unit.pieces), main):
                return
            # Repeated short records are coded once per unit: exact only when packed records are isolated,
            # i.e. the gap is at least the model's isolation gap (self.gap is never less, see __init__).
            unit_batches = batches(unit, s.window, self.halo, s.batch_size, self.gap, dereplicate=True)
            while True:
                t0 = time.perf_counter()
                batch = next(unit_batches, None)
                if batch is not None and self.dev.type == "cuda":
                    batch.ids_t = torch.from_numpy(batch.ids).pin_memory()
                stats.read_s += time.perf_counter() - t0
                if batch is None:
                    break
                if not self._put(self.in_q, ("batch", batch), main):
                    return
            if not self._put(self.in_q, ("end", unit.index), main):
                return
        self._put(self.in_q, ("done",), main)

    def _keep(self, index: int) -> bool:
        """Resume: whether shard `index`, written before, is whole (sizes and index structure; with
        verify its checksums too). A damaged one is noted in stats.redone and re-done."""
        problem = shard_problem(self.out_dir, index, self.levels, self.codes_dtype, checksums=self.verify)
        if problem is None:
            return True
        base = os.path.join(self.out_dir, shard_name(index))
        known = any(f"{shard_name(index)}." in line for line in self.stats.redone)  # found by _check_existing
        if not known and (os.path.exists(base + ".bin") or os.path.exists(base + ".idx")):  # not just never written
            self.stats.redone.append(problem)
        return False

    def compute(self, batch: Batch) -> None:
        if self.dev.type == "cpu":
            t0 = time.perf_counter()
            ids = torch.from_numpy(batch.ids)
            batch.codes = self.model.encode(ids, ids < PAD)
            self.stats.compute_s += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ids = batch.ids_t.to(self.dev, non_blocking=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            codes = self.model.encode(ids, ids < PAD)
        end.record()
        batch.codes = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True)
        batch.codes.copy_(codes, non_blocking=True)
        batch.event = torch.cuda.Event()
        batch.event.record()
        batch.timing = (start, end)

    def write(self) -> None:
        import tqdm

        stats, sizes, levels = self.stats, self.codebook_sizes, len(self.codebook_sizes)
        total = _estimate_bases(self.inputs) if self.progress else None
        bar = tqdm.tqdm(total=total, unit=" bases", unit_scale=True, desc="tokenize", disable=not self.progress, dynamic_ncols=True)
        writer: Optional[ShardWriter] = None
        try:
            while True:
                item = self._get(self.out_q)
                if item[0] == "done" and total is not None:
                    bar.total = bar.n  # the total was an estimate from file sizes
                    bar.refresh()
                if item[0] in ("done", "stop"):
                    return
                t0 = time.perf_counter()
                if item[0] == "unit":
                    writer = ShardWriter(self.out_dir, item[1], item[2], sizes)
                elif item[0] == "end":
                    writer.close()
                    stats.shards_written += 1
                    stats.records += int((writer.pieces.ordinals >= 0).sum())  # -1: continues a record
                    for level, counts in enumerate(writer.usage):
                        stats.usage[level] += counts
                    writer = None
                else:
                    batch = item[1]
                    if batch.event is not None:  # GPU: wait for this batch's device-to-host copy only
                        batch.event.synchronize()
                        stats.compute_s += batch.timing[0].elapsed_time(batch.timing[1]) / 1e3
                    codes = batch.codes.numpy().reshape(-1, levels)[batch.gather]
                    stats.encoded_bases += len(batch.gather)
                    stats.encoded_positions += batch.ids.size
                    parts = [codes]
                    if batch.scatter is not None:  # a dereplicated unit: its output bases [e0, e1)
                        plan, k0, e0, e1 = batch.scatter
                        stats.copied_records += plan.copied if k0 == 0 else 0
                        parts = plan.scatter(codes, k0, e0, e1)
                    for part in parts:
                        writer.write(part)
                        stats.bases += len(part)
                        bar.update(len(part))
                stats.write_s += time.perf_counter() - t0
        finally:
            bar.close()
            if writer is not None:
                writer.abort()

    def run(self) -> None:
        """Run every stage to the end; the first error of any stage is raised here."""
        main = threading.current_thread()
        # Objects alive now (torch, the model, ...) live to the end: keep the cyclic collector off them,
        # or its full passes, triggered by the reader's per-record allocations, rescan them all.
        gc.freeze()
        try:
            self._run_stages(main)
        finally:
            gc.unfreeze()

    def _run_stages(self, main: threading.Thread) -> None:
        reader = _Stage(lambda: self.read(main), "vqdna-tokenize-read")
        writer = _Stage(self.write, "vqdna-tokenize-write")
        failure: Optional[BaseException] = None
        reader.start()
        writer.start()
        try:
            device_ctx = torch.cuda.device(self.dev) if self.dev.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), device_ctx:
                while True:
                    item = self._get(self.in_q, reader)
                    if item[0] == "stop":
                        break
                    if item[0] == "batch":
                        self.compute(item[1])
                    if not self._put(self.out_q, item, writer) or item[0] == "done":
                        break
        except BaseException as exc:  # noqa: BLE001  (stop the stages, then re-raise)
            failure = exc
        if failure is not None or reader.error is not None or writer.error is not None:
            self.stop.set()
        reader.join()
        writer.join()
        failure = failure or reader.error or writer.error
        if failure is None and self.stop.is_set():
            failure = TokenizeError("the tokenization pipeline stopped early")
        if failure is not None:
            raise failure
