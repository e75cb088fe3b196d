"""The output directory of a run (docs/token-files.md): what the manifest records about the run, the
checks before any compute (foreign entries, the lock, resuming only a matching run) and the final
manifest. The bytes of manifest and shards are read and written by vqdna.streaming.token_files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Sequence

from vqdna.data.fingerprint import head_tail_sha256
from vqdna.data.integrity import (
    CHECKSUM,
    DirectoryLock,
    DirectoryLockedError,
    foreign_entry,
    parse_entry,
    remove_leftover,
)
from vqdna.streaming.settings import Settings, TokenizeError
from vqdna.streaming.token_files import (
    FORMAT_VERSION,
    MANIFEST,
    codes_dtype,
    link_shards,
    read_manifest,
    shard_entry,
    shard_name,
    shard_problem,
    write_manifest,
)

__all__ = ["finish_directory", "prepare_directory", "run_manifest"]

# Manifest keys compared on resume with their own messages; every other key of run_manifest() must
# simply be equal.
_IDENTITY_KEYS = ("format", "format_version", "tokenizer", "inputs", "checksum")


def _input_fingerprint(path: str) -> dict:
    """Input identity without reading it all: size and sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    return {"path": path, "size": size, "sha256_head_tail": head_tail_sha256(path, size)}


def _tokenizer_sha256(model) -> str:
    sha = getattr(model, "tokenizer_sha256", None)
    if sha:
        return sha
    # A model not loaded from / saved to a file: hash its weights as safetensors would store them.
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()


def _config_dict(model) -> dict:
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


def run_manifest(model, inputs: Sequence[str], settings: Settings) -> dict:
    """What the manifest records about a run (before "complete", "shards" and the totals): format,
    tokenizer identity, code layout, settings and inputs. Every key changes the output bytes."""
    codebook_sizes = [int(k) for k in model.config.codebook_sizes]
    return {
        "format": "vqdna-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": {"sha256": _tokenizer_sha256(model), "config": _config_dict(model)},
        "levels": len(codebook_sizes),
        "codebook_sizes": codebook_sizes,
        "dtype": codes_dtype(codebook_sizes),
        "halo": int(model.receptive_radius),
        **settings.manifest_fields(),
        "inputs": [_input_fingerprint(p) for p in inputs],
        "checksum": CHECKSUM,
    }


def _check_run(old: dict, new: dict, out_dir: str) -> None:
    """TokenizeError naming everything that differs between a manifest and this run (run_manifest)."""
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
    for key in new:
        if key not in _IDENTITY_KEYS and old.get(key) != new[key]:
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


def _check_existing(out_dir: str, run: dict, resume: bool, verify: bool) -> list[str]:
    """Under the lock: check the directory's manifest against this run, and write the incomplete
    manifest unless the directory is complete and whole. A complete directory being resumed has every
    shard re-checked (sizes and index structure; with `verify` the checksums); a damaged shard loses
    its .idx so that the run re-does it. Returns what was wrong, per damaged shard."""
    old = read_manifest(out_dir)
    if old is None:  # a new directory (_refuse_foreign: it holds no shard)
        write_manifest(out_dir, {**run, "complete": False})
        return []
    if not resume:
        raise TokenizeError(
            f"{out_dir}: already holds token files; pass --resume to continue them, or choose another --out"
        )
    _check_run(old, run, out_dir)
    damaged = {}
    if old.get("complete"):
        for k, entry in enumerate(old["shards"]):
            problem = shard_problem(out_dir, k, run["levels"], run["dtype"], entry, checksums=verify)
            if problem is not None:
                damaged[k] = problem
        if not damaged:
            return []
    write_manifest(out_dir, {**run, "complete": False})  # first: readers refuse the directory from now on
    for k in damaged:  # ours (listed in our manifest) and wrong: without its .idx the run re-does it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, shard_name(k) + ".idx"))
    return list(damaged.values())


def prepare_directory(out_dir: str, run: dict, resume: bool, verify: bool) -> tuple[DirectoryLock, list[str]]:
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
        return lock, _check_existing(out_dir, run, resume, verify)
    except BaseException:
        lock.release()
        raise


def finish_directory(out_dir: str, run: dict, n_units: int) -> dict:
    """Rank 0, after every rank is done: check every shard, record its sizes and checksums, remove the
    temporary files of interrupted runs (our names only), mark the manifest complete."""
    shards, summaries, bases = [], [], 0
    for k in range(n_units):
        problem = shard_problem(out_dir, k, run["levels"], run["dtype"])
        if problem is not None:
            raise TokenizeError(f"{out_dir}: {shard_name(k)} is missing or incomplete after the run ({problem})")
        entry, summary = shard_entry(out_dir, k)
        shards.append(entry)
        summaries.append(summary)
        bases += entry["bases"]
    records = link_shards(shards, summaries)  # each shard's record numbers and split records, O(shards)
    for name in os.listdir(out_dir):
        parsed = parse_entry(name)
        if parsed is not None and parsed[2]:
            remove_leftover(os.path.join(out_dir, name))
    manifest = {**run, "complete": True, "shards": shards, "records": records, "bases": bases}
    write_manifest(out_dir, manifest)
    return manifest
