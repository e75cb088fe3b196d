"""The entry point of streaming tokenization (docs/design.md §2.5): `tokenize_files`, FASTA files -> token files
(docs/token-files.md), on a CPU, one GPU, or many `torchrun` ranks, resumable byte for byte."""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np

from vqdna.streaming.directory import finish_directory, prepare_directory, run_manifest
from vqdna.streaming.distributed import all_ranks_ok, distributed, from_rank0, on_rank0, sum_over_ranks
from vqdna.streaming.pipeline import Pipeline, TokenizeStats
from vqdna.streaming.settings import DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS, DEFAULT_WINDOW, Settings, TokenizeError
from vqdna.streaming.token_files import read_manifest
from vqdna.streaming.units import plan_units

__all__ = ["tokenize_files"]


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

    window, batch_size, device, dtype, shard_bases, shard_records: see `Settings` (the defaults are
    its defaults). resume: continue the run that wrote out_dir; shards written before are re-checked
    (sizes and index structure; with verify=True their checksums too) and damaged ones re-done.
    Under torch.distributed every rank calls this with the same arguments.
    Returns the run's TokenizeStats (summed over ranks; totals from rank 0's manifest).

    Everything that can be checked before out_dir is touched is (settings, device, inputs); then rank 0
    takes out_dir's lock (TokenizeError naming the holder's pid if another run has it), refuses entries
    the format does not define, and holds the lock until this call returns, however it ends.
    """
    t_start = time.perf_counter()
    rank, world = distributed()
    inputs = [os.fspath(p) for p in inputs]
    settings = Settings(window=window, batch_size=batch_size, device=device, dtype=dtype,
                        shard_bases=shard_bases, shard_records=shard_records)
    for path in inputs:
        if not os.path.isfile(path):
            raise TokenizeError(f"{path}: no such input file")
    run = run_manifest(model, inputs, settings)
    prepared = on_rank0(lambda: prepare_directory(out_dir, run, resume, verify), rank, world)
    lock, damaged = prepared if prepared is not None else (None, [])
    try:
        return _run(model, inputs, out_dir, settings, run, damaged, t_start, rank=rank, world=world,
                    resume=resume, verify=verify, progress=progress)
    finally:
        if lock is not None:
            lock.release()


def _run(model, inputs, out_dir, settings: Settings, run: dict, damaged, t_start, *, rank, world, resume, verify, progress) -> TokenizeStats:
    """tokenize_files once out_dir is prepared (and locked by rank 0)."""
    stats = TokenizeStats(usage=[np.zeros(k, dtype=np.int64) for k in run["codebook_sizes"]], redone=list(damaged))
    manifest = read_manifest(out_dir)
    if manifest.get("complete"):  # every shard checked by prepare_directory: nothing left to do
        stats.total_records, stats.total_bases = manifest["records"], manifest["bases"]
        stats.shards_skipped = len(manifest["shards"])
        stats.seconds = time.perf_counter() - t_start
        return stats

    # Several ranks: rank 0 plans (plain FASTA: from the file's size and first MiB; compressed and
    # FASTQ inputs: one pass that keeps a few numbers per unit) and broadcasts the plan, so each rank
    # reads only its own units' bytes (docs/design.md §2.5, docs/token-files.md).
    plan = None
    if world > 1:
        plan = from_rank0(lambda: plan_units(inputs, settings.shard_bases, settings.shard_records), rank, world)
    pipeline = Pipeline(
        model.to(settings.torch_device).eval(), inputs, out_dir, settings, run, stats,
        rank=rank, world=world, resume=resume, verify=verify, progress=progress, plan=plan,
    )
    failure = None
    try:
        pipeline.run()
    except BaseException as exc:  # noqa: BLE001  (every rank must reach the collective below)
        failure = exc
    all_ranks_ok(failure, rank, world)
    if world > 1:
        sum_over_ranks(stats, settings.torch_device)
    manifest = on_rank0(lambda: finish_directory(out_dir, run, pipeline.n_units), rank, world)
    if manifest is not None:
        stats.total_records, stats.total_bases = manifest["records"], manifest["bases"]
    stats.seconds = time.perf_counter() - t_start
    return stats
