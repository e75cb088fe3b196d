"""vqdna.bench.table: winners of measured rows (backends only, the 10% margin for the default order)
and the merge of a run into a table file."""

import pytest

from vqdna.bench.table import MARGIN, update_table, winners
from vqdna.kernels import dispatch


def _row(op, backend, ms, n=1024, k=512, dtype="float32", kind="backend"):
    return {"op": op, "backend": backend, "kind": kind, "dtype": dtype, "ms": ms, "shape": {"N": n, "K": k},
            "table": {"op": op, "N": n, "K": k}}


def test_winner_is_the_fastest_backend_not_a_peer():
    rows = [_row("lookup", "native", 5.0), _row("lookup", "reference", 2.0), _row("lookup", "torch", 1.0, kind="peer")]
    (entry,) = winners(rows, "cpu")
    assert entry["backend"] == "reference" and set(entry["ms"]) == {"native", "reference"}


def test_default_order_keeps_a_near_tie():
    rows = [_row("lookup", "native", 1.0 * MARGIN - 1e-3), _row("lookup", "reference", 1.0)]
    assert winners(rows, "cpu")[0]["backend"] == "native"  # within the margin: the default order stands
    rows = [_row("lookup", "native", 1.0 * MARGIN + 1e-2), _row("lookup", "reference", 1.0)]
    assert winners(rows, "cpu")[0]["backend"] == "reference"


def test_update_merges_ops_and_devices(tmp_path):
    path = tmp_path / "t.json"
    src = {"commit": "abc"}
    update_table([_row("lookup", "native", 1.0), _row("lookup", "reference", 3.0)], "cpu", "CPU A", src, path=str(path))
    update_table([_row("lookup", "native", 1.0)], "cpu", "CPU B", src, path=str(path))
    _, table = update_table([_row("ema_stats", "reference", 1.0, k=64), _row("ema_stats", "native", 2.0, k=64)],
                            "cpu", "CPU A", {"commit": "def"}, path=str(path))
    assert dispatch.load_backend_table(path) == table
    a = table["devices"]["cpu/CPU A"]
    assert [(e["op"], e["backend"]) for e in a["entries"]] == [("ema_stats", "reference"), ("lookup", "native")]
    assert a["sources"] == {"ema_stats": {"commit": "def"}, "lookup": {"commit": "abc"}}
    assert "cpu/CPU B" in table["devices"]
    # a new run of an op replaces that op's points, not the others
    _, table = update_table([_row("lookup", "reference", 1.0, n=4096), _row("lookup", "native", 9.0, n=4096)],
                            "cpu", "CPU A", src, path=str(path))
    entries = table["devices"]["cpu/CPU A"]["entries"]
    assert [(e["op"], e["N"], e["backend"]) for e in entries] == [("ema_stats", 1024, "reference"), ("lookup", 4096, "reference")]


def test_no_backend_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no vqdna backend results"):
        update_table([_row("lookup", "torch", 1.0, kind="peer")], "cpu", "X", {}, path=str(tmp_path / "t.json"))
