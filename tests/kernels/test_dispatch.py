"""dispatch: backend="auto" follows the measured backend table (vqdna/kernels/backend_table.json),
falls back to the documented default order where it has no entry, and stays traceable."""

import json
import logging

import pytest
import torch

from tests.conftest import require_backend
from vqdna.kernels import dispatch, ema_stats, hrq_quantize, lookup


def _table(entries, name=None):
    name = name or dispatch.device_name("cpu")
    return {"schema": 1, "devices": {dispatch.table_device_key("cpu", name): {
        "device_type": "cpu", "device_name": name, "entries": entries}}}


def _entry(op, n, k, backend, dtype="float32"):
    return {"op": op, "dtype": dtype, "N": n, "K": k, "backend": backend}


@pytest.fixture
def table(monkeypatch):
    """Install a table for one test; the packaged one is restored after."""
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    require_backend("native", "cpu")
    yield lambda t: dispatch.set_backend_table(t)
    dispatch.set_backend_table(None)


def test_table_picks_the_backend_by_op_dtype_and_size(table):
    # reference at small N, native at large N (K alike): each call takes its nearest measured point
    table(_table([_entry("lookup", 1024, 512, "reference"), _entry("lookup", 1 << 20, 512, "native"),
                  _entry("ema_stats", 1024, 512, "reference")]))
    for n, want in ((1, "reference"), (900, "reference"), (2048, "reference"), (1 << 15, "native"), (1 << 22, "native")):
        lookup(torch.randn(n, 8), torch.randn(300, 8))
        assert dispatch.last_backend("lookup") == want, n
    lookup(torch.randn(10, 8).bfloat16(), torch.randn(300, 8).bfloat16())  # no bfloat16 entry: default order
    assert dispatch.last_backend("lookup") == "native"
    ema_stats(torch.randn(50, 8), torch.randint(4, (50,)), 4)
    assert dispatch.last_backend("ema_stats") == "reference"
    hrq_quantize([torch.randn(5, 8)] * 2, [torch.randn(4, 8)] * 2)  # no hrq entry: default order
    assert dispatch.last_backend("hrq_quantize") == "native"


def test_nearest_point_uses_k_too(table):
    table(_table([_entry("lookup", 4096, 64, "reference"), _entry("lookup", 4096, 65536, "native")]))
    lookup(torch.randn(100, 4), torch.randn(50, 4))
    assert dispatch.last_backend("lookup") == "reference"
    lookup(torch.randn(100, 4), torch.randn(30000, 4))
    assert dispatch.last_backend("lookup") == "native"


def test_unknown_device_uses_the_default_order_and_says_why(table, caplog):
    table(_table([_entry("lookup", 1024, 512, "reference")], name="Some Other CPU 9000"))
    with caplog.at_level(logging.DEBUG, logger="vqdna.kernels"):
        lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "native"
    assert "no entry for this device" in caplog.text and "default order" in caplog.text


def test_a_winner_that_cannot_run_here_is_logged_not_taken(table, caplog):
    table(_table([_entry("lookup", 1024, 512, "cuda")]))
    with caplog.at_level(logging.DEBUG, logger="vqdna.kernels"):
        lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "native"
    assert "cannot run here" in caplog.text


def test_explicit_backend_and_env_override_the_table(table, monkeypatch):
    table(_table([_entry("lookup", 1024, 512, "reference")]))
    lookup(torch.randn(10, 8), torch.randn(4, 8), backend="native")
    assert dispatch.last_backend("lookup") == "native"
    monkeypatch.setenv("VQDNA_BACKEND", "native")
    lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "native"


def test_table_file_from_env(table, tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table([_entry("lookup", 1024, 512, "reference")])))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))
    dispatch.set_backend_table(None)
    lookup(torch.randn(10, 8), torch.randn(4, 8))
    assert dispatch.last_backend("lookup") == "reference"


def test_bad_table_names_file_and_entry(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_table([{"op": "lookup", "dtype": "float32", "N": 1, "K": 2, "backend": "fast"}])))
    with pytest.raises(ValueError, match=r"bad\.json.*entries\[0\]"):
        dispatch.load_backend_table(path)


def test_packaged_table_loads_and_names_real_backends():
    table = dispatch.load_backend_table(dispatch.DEFAULT_TABLE_PATH)
    assert table["devices"], "the shipped table has at least the CPU it was measured on"
    for dev in table["devices"].values():
        assert dev["entries"] and dev["source"]["commit"]


def test_torch_compile_follows_the_table(table):
    table(_table([_entry("lookup", 64, 16, "reference")]))

    def f(z, e):
        codes, dist = lookup(z, e)
        return e[codes.long()] + dist[:, None]

    z, e = torch.randn(40, 12), torch.randn(9, 12)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(z, e), f(z, e))
    assert dispatch.last_backend("lookup") == "reference"


def test_float64_runs_only_on_the_reference(monkeypatch):
    """float64 is the spec's dtype: "auto" sends it to the reference, an explicit fast backend refuses it with a
    TypeError naming the op, for every declared op and every backend that runs here."""
    from vqdna.kernels.ops.registry import declarations

    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    cpu = torch.device("cpu")
    checked = 0
    for op in declarations():
        assert dispatch.select_backend(op, "auto", cpu, torch.float64) == "reference", op
        for backend in dispatch.available_backends(cpu, op):
            if backend == "reference":
                continue
            with pytest.raises(TypeError, match=f"vqdna.kernels.{op}: float64 inputs run only on the reference"):
                dispatch.select_backend(op, backend, cpu, torch.float64)
            checked += 1
        assert dispatch.select_backend(op, "reference", cpu, torch.float64) == "reference"
    assert checked > 0, "no fast backend runs here: the check checked nothing"
