"""Streaming tokenization (DESIGN 2.5): FASTA files -> token files (vqdna.data.tokens), on a CPU, one
GPU, or many `torchrun` ranks, resumable byte for byte.

Work units: the records of all inputs, in order, cut greedily into units of at most `shard_bases`
bases and `shard_records` pieces (a long record is split into pieces across units). Units depend only
on the input, so every rank derives the same list; unit k goes to rank k % world_size and becomes
shard k. Inside a unit, each piece is cut into windows of `window` bases read with a halo of
R = model.receptive_radius bases on each side (clipped at the record ends), so a base's codes do not
depend on where its record was cut: streaming equals encoding the record whole (up to near-ties).
Segments (windows, or whole short records) are packed into rows of window + 2R positions, R pad
positions (id 5, masked) apart, and rows into batches; the model zeroes features at masked positions.

Three stages overlap: a reader thread (FASTA decoding, packing; on GPU it pins the batch), the compute
stage (asynchronous host-to-device copy, inference under bf16 autocast or in float32, asynchronous
device-to-host copy into pinned memory) and a writer thread (waits for the copy, gathers the
segments' codes in piece order and appends them to the shard).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from vqdna.data.fasta import read_fasta
from vqdna.data.integrity import (
    CHECKSUM,
    DirectoryLock,
    DirectoryLockedError,
    foreign_entry,
    parse_entry,
    remove_leftover,
)
from vqdna.data.tokens import (
    FORMAT_VERSION,
    MANIFEST,
    Piece,
    ShardWriter,
    codes_dtype,
    read_manifest,
    shard_entry,
    shard_name,
    shard_problem,
    write_manifest,
)

__all__ = ["TokenizeError", "TokenizeStats", "tokenize_files", "work_units"]

PAD_ID = 5
DEFAULT_WINDOW = 8192
DEFAULT_SHARD_BASES = 1 << 26
DEFAULT_SHARD_RECORDS = 1 << 20
_QUEUE_DEPTH = 4  # batches in flight between stages: bounds memory, enough to keep stages busy
_CHECK_BYTES = 1 << 20


class TokenizeError(RuntimeError):
    """The run cannot start or continue (settings, inputs or tokenizer differ from the manifest...)."""


@dataclass
class Unit:
    """Work unit `index` (shard `index`): pieces of records in input order, and the base ids of their
    records (whole records, so windows can read their halo beyond the piece)."""

    index: int
    pieces: list[Piece]
    records: dict[int, np.ndarray]

    @property
    def bases(self) -> int:
        return sum(p.length for p in self.pieces)


@dataclass
class TokenizeStats:
    """What a run did. records/bases: computed by this run (all ranks); seconds: wall time; read_s,
    compute_s, write_s: busy time of each stage (they overlap); usage: per level, code counts [K_l]."""

    records: int = 0
    bases: int = 0
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


def work_units(paths: Sequence[str], shard_bases: int, shard_records: int) -> Iterator[Unit]:
    """The deterministic work units of the inputs (see the module docstring), streamed."""
    if shard_bases < 1 or shard_records < 1:
        raise ValueError(f"shard_bases and shard_records must be >= 1, got {shard_bases}, {shard_records}")
    index, ordinal, bases = 0, 0, 0
    pieces: list[Piece] = []
    records: dict[int, np.ndarray] = {}
    for path in paths:
        for rec in read_fasta(path):
            n, start = len(rec.ids), 0
            while True:
                take = min(n - start, shard_bases - bases)
                pieces.append(Piece(ordinal, rec.name, start, take, n))
                records[ordinal] = rec.ids
                bases, start = bases + take, start + take
                if bases >= shard_bases or len(pieces) >= shard_records:
                    yield Unit(index, pieces, records)
                    index, bases, pieces, records = index + 1, 0, [], {}
                if start >= n:
                    break
            ordinal += 1
    if pieces:
        yield Unit(index, pieces, records)


@dataclass
class _Batch:
    ids: np.ndarray  # uint8 [rows, L], PAD_ID where no base
    gather: np.ndarray  # int64 [m]: flat positions (row * L + col) of the output bases, in piece order
    ids_t: Optional[torch.Tensor] = None  # pinned copy (GPU path)
    codes: Optional[torch.Tensor] = None  # int32 [rows, L, n_levels] on the host
    event: Optional[object] = None  # CUDA event after the device-to-host copy
    timing: Optional[tuple] = None  # CUDA events around the compute


def _batches(unit: Unit, window: int, halo: int, rows: int) -> Iterator[_Batch]:
    """Pack the unit's windows into batches of at most `rows` rows of window + 2 * halo positions
    (trimmed to the longest row used); segments in a row are `halo` pad positions apart."""
    width = window + 2 * halo
    ids = np.full((rows, width), PAD_ID, dtype=np.uint8)
    row, col, used = 0, 0, 0
    starts: list[int] = []  # per segment: row * width + col of its first output base
    lengths: list[int] = []

    def emit(n_rows: int) -> _Batch:
        s = np.asarray(starts, dtype=np.int64)
        seg_rows, seg_cols = np.divmod(s, width)
        lens = np.asarray(lengths, dtype=np.int64)
        offsets = np.cumsum(lens) - lens
        # position j of segment i sits at seg_rows[i] * used + seg_cols[i] + j in the trimmed batch
        gather = np.repeat(seg_rows * used + seg_cols - offsets, lens) + np.arange(int(lens.sum()), dtype=np.int64)
        return _Batch(np.ascontiguousarray(ids[:n_rows, :used]), gather)

    for piece in unit.pieces:
        seq = unit.records[piece.ordinal]
        end = piece.start + piece.length
        for out_start in range(piece.start, end, window):
            out_end = min(out_start + window, end)
            in_start, in_end = max(0, out_start - halo), min(piece.record_length, out_end + halo)
            if col + (in_end - in_start) > width:  # does not fit: next row
                row, col = row + 1, 0
                if row == rows:
                    yield emit(rows)
                    ids = np.full((rows, width), PAD_ID, dtype=np.uint8)
                    row, used, starts, lengths = 0, 0, [], []
            ids[row, col : col + in_end - in_start] = seq[in_start:in_end]
            starts.append(row * width + col + out_start - in_start)
            lengths.append(out_end - out_start)
            used = max(used, col + in_end - in_start)
            col += in_end - in_start + halo
    if lengths:
        yield emit(row + 1)


def _fingerprint(path: str) -> dict:
    """Input identity without reading it all: size and sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_CHECK_BYTES))
        if size > _CHECK_BYTES:
            f.seek(max(_CHECK_BYTES, size - _CHECK_BYTES))
            digest.update(f.read())
    return {"path": path, "size": size, "sha256_head_tail": digest.hexdigest()}


def _tokenizer_sha256(model) -> str:
    sha = getattr(model, "tokenizer_sha256", None)
    if sha:
        return sha
    # A model not loaded from / saved to a file: hash its weights as safetensors would store them.
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()


def _config_dict(model) -> dict:
    import json

    config = getattr(model, "config", None)
    if config is None:
        return {}
    d = json.loads(config.to_json_string(use_diff=False))
    # The tokenizer's identity is its sha256: not the library version, nor where it was loaded from.
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


def _code_config(config: dict) -> dict:
    """The part of a tokenizer config (a manifest's tokenizer.config) that changes the codes for given
    weights: with the weights' sha256, the tokenizer's identity (VQDNATokenizerConfig.code_keys)."""
    from vqdna.models.tokenizer_model import VQDNATokenizerConfig

    return {k: config[k] for k in VQDNATokenizerConfig.code_keys if k in config}


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


def _check_settings(old: dict, new: dict, out_dir: str) -> None:
    """TokenizeError naming everything that differs between a manifest and this run."""
    problems = []
    if old.get("format_version") != new["format_version"]:
        problems.append(
            f"it was written in format version {old.get('format_version')} by an older vqdna; this one writes "
            f"version {new['format_version']} (TokenDataset still reads it)"
        )
    if old.get("tokenizer", {}).get("sha256") != new["tokenizer"]["sha256"]:
        problems.append(
            f"the tokenizer changed (sha256 {old.get('tokenizer', {}).get('sha256')} in the manifest, "
            f"{new['tokenizer']['sha256']} now)"
        )
    old_code, new_code = _code_config(old.get("tokenizer", {}).get("config", {})), _code_config(new["tokenizer"]["config"])
    for key in sorted(set(old_code) | set(new_code)):
        if old_code.get(key) != new_code.get(key):
            problems.append(f"the tokenizer changed: its config's {key} was {old_code.get(key)} and is now {new_code.get(key)}")
    old_inputs, new_inputs = old.get("inputs", []), new["inputs"]
    if len(old_inputs) != len(new_inputs):
        problems.append(f"the inputs changed ({len(old_inputs)} files in the manifest, {len(new_inputs)} now)")
    else:
        for o, n in zip(old_inputs, new_inputs):
            if os.path.basename(o["path"]) != os.path.basename(n["path"]):
                problems.append(f"input {n['path']} is not {o['path']} of the manifest")
            elif o["size"] != n["size"] or o["sha256_head_tail"] != n["sha256_head_tail"]:
                problems.append(f"input {n['path']} changed since the manifest (size {o['size']} -> {n['size']} or content)")
    for key in ("levels", "codebook_sizes", "dtype", "window", "halo", "batch_size", "shard_bases", "shard_records", "compute"):
        if old.get(key) != new[key]:
            problems.append(f"{key} was {old.get(key)} and is now {new[key]}")
    if problems:
        raise TokenizeError(
            f"{os.path.join(out_dir, MANIFEST)}: cannot resume: " + "; ".join(problems)
            + ". Use the original inputs and settings, or a new --out directory."
        )


def _refuse_foreign(out_dir: str) -> None:
    """TokenizeError naming the first entry of out_dir that this command did not write, or the shard
    files of a directory without a manifest (checked before any compute; nothing is written or
    removed there)."""
    why = foreign_entry(out_dir)
    if why is not None:
        raise TokenizeError(
            f"{out_dir}: not empty and not a vqdna token directory (holds {why}); nothing was written or "
            "removed there: choose another --out, or move that entry away"
        )
    if not os.path.lexists(os.path.join(out_dir, MANIFEST)):
        shards = sorted(n for n in os.listdir(out_dir) if parse_entry(n) is not None)
        if shards:
            raise TokenizeError(
                f"{out_dir}: holds shard files ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) but no "
                f"{MANIFEST}: shards without their manifest may come from another run and are never reused; "
                "remove them, or choose another --out"
            )


def _check_existing(out_dir: str, settings: dict, resume: bool, verify: bool) -> list[str]:
    """Under the lock: check the directory's manifest against this run, and write the incomplete
    manifest unless the directory is complete and whole. A complete directory being resumed has every
    shard re-checked (sizes and index structure; with `verify` the checksums); a damaged shard loses
    its .idx so that the run re-does it. Returns what was wrong, per damaged shard."""
    old = read_manifest(out_dir)
    if old is None:  # a new directory (_refuse_foreign: it holds no shard)
        write_manifest(out_dir, {**settings, "complete": False})
        return []
    if not resume:
        raise TokenizeError(
            f"{out_dir}: already holds token files; pass --resume to continue them, or choose another --out"
        )
    _check_settings(old, settings, out_dir)
    damaged = {}
    if old.get("complete"):
        for k, entry in enumerate(old["shards"]):
            problem = shard_problem(out_dir, k, settings["levels"], settings["dtype"], entry, checksums=verify)
            if problem is not None:
                damaged[k] = problem
        if not damaged:
            return []
    write_manifest(out_dir, {**settings, "complete": False})  # first: readers refuse the directory from now on
    for k in damaged:  # ours (listed in our manifest) and wrong: without its .idx the run re-does it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, shard_name(k) + ".idx"))
    return list(damaged.values())


def _prepare_directory(out_dir: str, settings: dict, resume: bool, verify: bool) -> tuple[DirectoryLock, list[str]]:
    """Rank 0, before any compute: create out_dir or check that it holds only files this command writes,
    take its lock (held until the run ends: the caller releases it), check or write the manifest
    (_check_existing). Returns the lock and the damaged shards that will be re-done."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise TokenizeError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    _refuse_foreign(out_dir)  # before the lock file is created: a foreign directory gets nothing added
    try:
        lock = DirectoryLock(out_dir)
    except DirectoryLockedError as exc:
        raise TokenizeError(str(exc)) from None
    try:
        _refuse_foreign(out_dir)  # again, now that no other run can add anything
        return lock, _check_existing(out_dir, settings, resume, verify)
    except BaseException:
        lock.release()
        raise


def _finish_directory(out_dir: str, settings: dict, n_units: int) -> dict:
    """Rank 0, after every rank is done: check every shard, record its sizes and checksums, remove the
    temporary files of interrupted runs (our names only), mark the manifest complete."""
    shards, records, bases = [], 0, 0
    for k in range(n_units):
        problem = shard_problem(out_dir, k, settings["levels"], settings["dtype"])
        if problem is not None:
            raise TokenizeError(f"{out_dir}: {shard_name(k)} is missing or incomplete after the run ({problem})")
        entry, starts = shard_entry(out_dir, k)
        shards.append(entry)
        records += starts
        bases += entry["bases"]
    for name in os.listdir(out_dir):
        parsed = parse_entry(name)
        if parsed is not None and parsed[2]:
            remove_leftover(os.path.join(out_dir, name))
    manifest = {**settings, "complete": True, "shards": shards, "records": records, "bases": bases}
    write_manifest(out_dir, manifest)
    return manifest


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_rank0(fn, rank: int, world: int):
    """Run fn() on rank 0; its error (TokenizeError/OSError) is raised on every rank (a collective:
    every rank calls this). Returns fn()'s result on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (TokenizeError, OSError) as exc:
            error = exc
    message = None if error is None else str(error)
    if world > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise TokenizeError(message)
    return result


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


class _Pipeline:
    """One rank's reader thread -> compute (the calling thread) -> writer thread, joined by bounded
    queues of items ("unit", index, pieces), ("batch", _Batch), ("end", index), ("done",)."""

    def __init__(self, model, inputs, out_dir, settings, stats, *, dev, dtype, rank, world, resume, verify, progress):
        self.model, self.inputs, self.out_dir, self.settings, self.stats = model, inputs, out_dir, settings, stats
        self.dev, self.dtype, self.rank, self.world, self.resume = dev, dtype, rank, world, resume
        self.verify = verify
        self.progress = progress and rank == 0
        self.codebook_sizes = settings["codebook_sizes"]
        self.n_units = 0
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
        units = work_units(self.inputs, s["shard_bases"], s["shard_records"])
        while True:
            t0 = time.perf_counter()
            unit = next(units, None)  # FASTA decoding happens here
            stats.read_s += time.perf_counter() - t0
            if unit is None:
                break
            self.n_units = unit.index + 1
            if unit.index % self.world != self.rank:
                continue
            if self.resume and self._keep(unit.index):
                stats.shards_skipped += 1
                continue
            if not self._put(self.in_q, ("unit", unit.index, unit.pieces), main):
                return
            batches = _batches(unit, s["window"], s["halo"], s["batch_size"])
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
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
        s = self.settings
        problem = shard_problem(self.out_dir, index, s["levels"], s["dtype"], checksums=self.verify)
        if problem is None:
            return True
        base = os.path.join(self.out_dir, shard_name(index))
        known = any(f"{shard_name(index)}." in line for line in self.stats.redone)  # found by _check_existing
        if not known and (os.path.exists(base + ".bin") or os.path.exists(base + ".idx")):  # not just never written
            self.stats.redone.append(problem)
        return False

    def compute(self, batch: _Batch) -> None:
        if self.dev.type == "cpu":
            t0 = time.perf_counter()
            ids = torch.from_numpy(batch.ids)
            batch.codes = self.model.encode(ids, ids < PAD_ID)
            self.stats.compute_s += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ids = batch.ids_t.to(self.dev, non_blocking=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            codes = self.model.encode(ids, ids < PAD_ID)
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
                    stats.records += sum(p.start == 0 for p in writer.pieces)
                    for level, counts in enumerate(writer.usage):
                        stats.usage[level] += counts
                    writer = None
                else:
                    batch = item[1]
                    if batch.event is not None:  # GPU: wait for this batch's device-to-host copy only
                        batch.event.synchronize()
                        stats.compute_s += batch.timing[0].elapsed_time(batch.timing[1]) / 1e3
                    writer.write(batch.codes.numpy().reshape(-1, levels)[batch.gather])
                    stats.bases += len(batch.gather)
                    bar.update(len(batch.gather))
                stats.write_s += time.perf_counter() - t0
        finally:
            bar.close()
            if writer is not None:
                writer.abort()

    def run(self) -> None:
        """Run every stage to the end; the first error of any stage is raised here."""
        main = threading.current_thread()
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


def _all_ranks_ok(failure: Optional[BaseException], rank: int, world: int) -> None:
    """Every rank learns whether any rank failed (a collective); the failing rank re-raises its own."""
    errors = [None if failure is None else f"rank {rank}: {failure}"]
    if world > 1:
        import torch.distributed as dist

        errors = [None] * world
        dist.all_gather_object(errors, None if failure is None else f"rank {rank}: {failure}")
    if failure is not None:
        raise failure
    if any(errors):
        raise TokenizeError("; ".join(e for e in errors if e))


def _sum_over_ranks(stats: TokenizeStats, dev: torch.device) -> None:
    import torch.distributed as dist

    sizes = [len(u) for u in stats.usage]
    totals = torch.tensor([stats.records, stats.bases, stats.shards_written, stats.shards_skipped], dtype=torch.int64)
    usage = torch.from_numpy(np.concatenate(stats.usage))
    if dist.get_backend() == "nccl":
        totals, usage = totals.to(dev), usage.to(dev)
    dist.all_reduce(totals)
    dist.all_reduce(usage)
    stats.records, stats.bases, stats.shards_written, stats.shards_skipped = (int(v) for v in totals.cpu())
    stats.usage = list(np.split(usage.cpu().numpy(), np.cumsum(sizes)[:-1]))
    redone = [None] * dist.get_world_size()
    dist.all_gather_object(redone, stats.redone)
    stats.redone = [line for lines in redone for line in lines]


def tokenize_files(
    inputs: Sequence[str],
    out_dir: str,
    model,
    *,
    window: int = DEFAULT_WINDOW,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    shard_bases: int = DEFAULT_SHARD_BASES,
    shard_records: int = DEFAULT_SHARD_RECORDS,
    resume: bool = False,
    verify: bool = False,
    progress: bool = False,
) -> TokenizeStats:
    """Tokenize FASTA `inputs` into the token directory `out_dir` with `model` (a VQDNATokenizerModel
    or anything with its `encode(ids, mask) -> int32 [B, L, n_levels]`, `receptive_radius`,
    `config.codebook_sizes`).

    window: output bases per window (inputs add the halo); batch_size: rows per batch (default 8 on
    CPU, 64 on CUDA); device: "cpu" or "cuda" (default: cuda when available; under torchrun each
    rank uses cuda:LOCAL_RANK); dtype: "fp32" or "bf16" (default bf16 on CUDA, fp32 on CPU, where
    only fp32 runs). resume: continue the run that wrote out_dir; shards written before are re-checked
    (sizes and index structure; with verify=True their checksums too) and damaged ones re-done.
    Under torch.distributed every rank calls this with the same arguments.
    Returns the run's TokenizeStats (summed over ranks; totals from rank 0's manifest).

    Everything that can be checked before out_dir is touched is (settings, device, inputs); then rank 0
    takes out_dir's lock (TokenizeError naming the holder's pid if another run has it), refuses entries
    the format does not define, and holds the lock until this call returns, however it ends.
    """
    t_start = time.perf_counter()
    rank, world = _distributed()
    inputs = [os.fspath(p) for p in inputs]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise TokenizeError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise TokenizeError(f"device {device!r}: {why}; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise TokenizeError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise TokenizeError(f"dtype must be fp32 or bf16, got {dtype!r}")
    if dtype == "bf16" and dev.type != "cuda":
        raise TokenizeError("bf16 inference runs on CUDA devices; use --dtype fp32 on the CPU")
    if batch_size is None:
        batch_size = 64 if dev.type == "cuda" else 8
    counts = {"window": window, "batch size": batch_size, "shard bases": shard_bases, "shard records": shard_records}
    for label, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TokenizeError(f"{label} must be an integer >= 1, got {value!r}")
    window, batch_size, shard_bases, shard_records = (int(v) for v in counts.values())
    for path in inputs:
        if not os.path.isfile(path):
            raise TokenizeError(f"{path}: no such input file")
    codebook_sizes = [int(k) for k in model.config.codebook_sizes]
    settings = {
        "format": "vqdna-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": {"sha256": _tokenizer_sha256(model), "config": _config_dict(model)},
        "levels": len(codebook_sizes),
        "codebook_sizes": codebook_sizes,
        "dtype": codes_dtype(codebook_sizes),
        "window": window,
        "halo": int(model.receptive_radius),
        "batch_size": batch_size,
        "shard_bases": shard_bases,
        "shard_records": shard_records,
        # fp32 on a GPU and on a CPU may break near-ties differently: resuming must not mix them.
        "compute": {"device": dev.type, "dtype": dtype},
        "inputs": [_fingerprint(p) for p in inputs],
        "checksum": CHECKSUM,
    }
    prepared = _on_rank0(lambda: _prepare_directory(out_dir, settings, resume, verify), rank, world)
    lock, damaged = prepared if prepared is not None else (None, [])
    try:
        return _run(model, inputs, out_dir, settings, damaged, t_start, dev=dev, dtype=dtype, rank=rank,
                    world=world, resume=resume, verify=verify, progress=progress)
    finally:
        if lock is not None:
            lock.release()


def _run(model, inputs, out_dir, settings, damaged, t_start, *, dev, dtype, rank, world, resume, verify, progress) -> TokenizeStats:
    """tokenize_files once out_dir is prepared (and locked by rank 0)."""
    stats = TokenizeStats(usage=[np.zeros(k, dtype=np.int64) for k in settings["codebook_sizes"]], redone=list(damaged))
    manifest = read_manifest(out_dir)
    if manifest.get("complete"):  # every shard checked by _prepare_directory: nothing left to do
        stats.total_records, stats.total_bases = manifest["records"], manifest["bases"]
        stats.shards_skipped = len(manifest["shards"])
        stats.seconds = time.perf_counter() - t_start
        return stats

    pipeline = _Pipeline(
        model.to(dev).eval(), inputs, out_dir, settings, stats,
        dev=dev, dtype=dtype, rank=rank, world=world, resume=resume, verify=verify, progress=progress,
    )
    failure = None
    try:
        pipeline.run()
    except BaseException as exc:  # noqa: BLE001  (every rank must reach the collective below)
        failure = exc
    _all_ranks_ok(failure, rank, world)
    if world > 1:
        _sum_over_ranks(stats, dev)
    manifest = _on_rank0(lambda: _finish_directory(out_dir, settings, pipeline.n_units), rank, world)
    if manifest is not None:
        stats.total_records, stats.total_bases = manifest["records"], manifest["bases"]
    stats.seconds = time.perf_counter() - t_start
    return stats
