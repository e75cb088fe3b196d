"""An input file's identity without reading all of it (used by token manifests and sequence indexes)."""

from __future__ import annotations

import hashlib

PROBE_BYTES = 1 << 20  # bytes hashed at each end of a file


def head_tail_sha256(path: str, size: int) -> str:
    """sha256 (hex) of the first PROBE_BYTES of the file of `size` bytes at `path`, then of its last
    PROBE_BYTES (those not already hashed): a changed header, tail or length changes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(PROBE_BYTES))
        if size > PROBE_BYTES:
            f.seek(max(PROBE_BYTES, size - PROBE_BYTES))
            digest.update(f.read(PROBE_BYTES))
    return digest.hexdigest()
