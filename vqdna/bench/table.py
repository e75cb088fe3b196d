"""The measured backend table (vqdna/kernels/backend_table.json): which backend won each measured
(op, dtype, N, K) point on a device, built from benchmark result rows (a run, or result JSON files).
`vqdna bench --write-table` regenerates it; vqdna.kernels.dispatch follows it for backend="auto"."""

from __future__ import annotations

import json
import os
from typing import Optional

from vqdna.kernels.dispatch import _AUTO_ORDER, BACKENDS, DEFAULT_TABLE_PATH, load_backend_table, table_device_key

# A backend displaces the default order's first choice only when it is this much faster: a winner
# by less than timing noise (this CPU is shared) would make "auto" flap between runs.
MARGIN = 1.10


def winners(rows: list[dict], device_type: str = "cpu") -> list[dict]:
    """One entry per measured point: {op, dtype, N, K, backend, ms: {backend: ms}}: the fastest of
    vqdna's backends (peers and variants are not candidates), unless the default order's first
    measured backend is within MARGIN of it (then that one)."""
    points: dict = {}
    for r in rows:
        t = r.get("table")
        if not t or r.get("kind") != "backend" or r["backend"] not in BACKENDS:
            continue
        key = (t["op"], r["dtype"], int(t["N"]), int(t["K"]))
        points.setdefault(key, {})[r["backend"]] = round(float(r["ms"]), 4)
    entries = []
    order = _AUTO_ORDER.get(device_type, ())
    for (op, dtype, n, k), times in sorted(points.items()):
        best = min(times, key=times.get)
        default = next((b for b in order if b in times), None)
        if default is not None and times[default] <= MARGIN * times[best]:
            best = default
        entries.append({"op": op, "dtype": dtype, "N": n, "K": k, "backend": best, "ms": times})
    return entries


def update_table(
    rows: list[dict], device_type: str, device_name: str, source: dict, path: Optional[str] = None
) -> tuple[str, dict]:
    """Write the winners of `rows` into the entry of (device_type, device_name) in the table at
    `path` (default: the packaged table): the (op, dtype) pairs this run measured are replaced, the
    device's other pairs and other devices are kept. Returns (path, table)."""
    path = str(path or DEFAULT_TABLE_PATH)
    table = load_backend_table(path) if os.path.exists(path) else {"schema": 1, "devices": {}}
    table.setdefault("schema", 1)
    table["about"] = (
        "Measured backend selection for backend='auto' (vqdna.kernels.dispatch): per device, the backend "
        "that won each measured (op, dtype, N, K) point; a call takes its nearest point in (log2 N, log2 K). "
        "Regenerate: vqdna bench --device <cpu|cuda> --size <small|full> --write-table"
    )
    entries = winners(rows, device_type)
    if not entries:
        raise ValueError("no vqdna backend results to build a table from (peers alone do not count)")
    key = table_device_key(device_type, device_name)
    old = table["devices"].get(key, {})
    measured = {(e["op"], e["dtype"]) for e in entries}
    kept = [e for e in old.get("entries", []) if (e["op"], e["dtype"]) not in measured]
    sources = {op: src for op, src in old.get("sources", {}).items() if op not in {op for op, _ in measured}}
    sources.update({op: source for op, _ in measured})
    table["devices"][key] = {
        "device_type": device_type,
        "device_name": device_name,
        "source": source,  # the latest run; `sources` says which run measured each op
        "sources": dict(sorted(sources.items())),
        "entries": sorted(kept + entries, key=lambda e: (e["op"], e["dtype"], e["N"], e["K"])),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path, table
