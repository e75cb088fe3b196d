"""The corpus-scale benchmark (bench/scale.py) at CI size: tokenizing 10x more short records must not
take more memory beyond a small bound (issue 22: memory independent of the record count)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _peak_gb(tmp_path, records):
    out = tmp_path / f"scale-{records}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-m", "bench.scale", "--records", str(records), "--length", "8", "--model", "null",
         "--threads", "1", "--workdir", str(tmp_path), "--json", str(out)],
        check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["records"] == records and result["shards"] == 1
    return result


def test_memory_does_not_grow_per_record(tmp_path):
    """20 k and 200 k records of 8 bases (one shard each: memory is bounded by a shard's records, see
    docs/token-files.md): peak RSS may grow by at most 100 MB, about 0.55 KB per extra record (measured
    about 0.3 KB; before issue 22, 0.9 KB: 165 MB here)."""
    small, large = _peak_gb(tmp_path, 20_000), _peak_gb(tmp_path, 200_000)
    growth_mb = (large["peak_rss_gb"] - small["peak_rss_gb"]) * 1e3
    assert growth_mb <= 100, f"peak RSS grew by {growth_mb:.0f} MB from 20 k to 200 k records: {small} {large}"
    assert large["first_find_s"] < 0.5  # the name index: no table is built (a scan took seconds at 1 M)
