"""`vqdna bench` (vqdna/commands/bench.py on vqdna.bench): a tiny CPU run writes the result schema,
the Markdown table and the plot; the backend table it writes round-trips into dispatch; --case
filters; bad inputs are clear errors."""

import json

import pytest
import torch

from vqdna import cli
from vqdna.kernels import dispatch, lookup

ROW_KEYS = {"op", "backend", "kind", "device", "dtype", "shape", "ms", "fraction_of_peak", "speedup_vs_reference"}
PROVENANCE = {"device", "device_name", "torch", "triton", "commit", "command", "date", "results"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny lookup run shared by the tests below (it is the slow part)."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "r.json", "plot": out / "r.png", "table": out / "table.json"}
    rc = cli.main(["bench", "--op", "lookup", "--size", "tiny", "--dtype", "float32", "--rounds", "2",
                   "--json", str(paths["json"]), "--plot", str(paths["plot"]), "--write-table", str(paths["table"])])
    dispatch.set_backend_table(None)  # the run pointed this process at its table; back to the default
    assert rc == 0
    return paths


def test_json_schema(tiny_run):
    data = json.loads(tiny_run["json"].read_text())
    assert PROVENANCE <= set(data), set(data)
    assert data["device_name"] == dispatch.device_name("cpu") and data["torch"] == torch.__version__
    rows = data["results"]
    backends = {r["backend"] for r in rows}
    assert {"native", "reference", "torch"} <= backends, backends
    assert all(r["op"] == "lookup" and r["dtype"] == "float32" and r["device"] == "cpu" for r in rows)
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["ms"] > 0 and r["gflops"] > 0 and r["peak_gflops"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["gflops"] / r["peak_gflops"])
        assert {"N", "K", "D"} <= set(r["shape"])
        assert r["gflops"] == pytest.approx(2 * r["shape"]["N"] * r["shape"]["K"] * r["shape"]["D"] / r["ms"] / 1e6)
        # every row carries its ratio to the reference and to each peer of its case, from this run
        ref = next(x for x in rows if x["shape"] == r["shape"] and x["backend"] == "reference")
        torch_row = next(x for x in rows if x["shape"] == r["shape"] and x["backend"] == "torch")
        assert r["speedup_vs_reference"] == pytest.approx(ref["ms"] / r["ms"])
        assert r["speedup_vs_torch"] == pytest.approx(torch_row["ms"] / r["ms"])
    shapes = {json.dumps(r["shape"], sort_keys=True) for r in rows}
    assert len(shapes) == 4  # tiny grid: N in {1024, 4096} at K=512, K in {64, 2048} at N=1024
    md = tiny_run["json"].with_suffix(".md").read_text()
    assert "vs ref" in md and data["commit"] in md


def test_plot_written(tiny_run):
    png = tiny_run["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_written_table_round_trips(tiny_run, monkeypatch):
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    table = dispatch.load_backend_table(tiny_run["table"])
    entry = table["devices"][dispatch.table_device_key("cpu", dispatch.device_name("cpu"))]
    data = json.loads(tiny_run["json"].read_text())
    measured = {(r["shape"]["N"], r["shape"]["K"]) for r in data["results"]}
    assert {(e["N"], e["K"]) for e in entry["entries"]} == measured
    assert entry["source"]["commit"] == data["commit"]
    for e in entry["entries"]:
        assert e["op"] == "lookup" and e["backend"] in ("native", "reference")
        assert set(e["ms"]) == {"native", "reference"}  # backends only: peers are not candidates
    # The same table rebuilt from the JSON file is identical (one command, from benchmark results).
    rebuilt = tiny_run["table"].parent / "rebuilt.json"
    assert cli.main(["bench", "--from-json", str(tiny_run["json"]), "--write-table", str(rebuilt)]) == 0
    assert dispatch.load_backend_table(rebuilt)["devices"] == table["devices"]
    # dispatch follows it: each measured point runs its recorded winner
    dispatch.set_backend_table(tiny_run["table"])
    try:
        for e in entry["entries"]:
            lookup(torch.randn(e["N"], 4), torch.randn(e["K"], 4))
            assert dispatch.last_backend("lookup") == e["backend"], e
    finally:
        dispatch.set_backend_table(None)


def test_from_json_rejects_other_files(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert cli.main(["bench", "--from-json", str(bad)]) == 2
    assert "x.json" in capsys.readouterr().err


def test_cuda_without_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["bench", "--device", "cuda", "--size", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_case_filter_runs_only_the_named_cases(tmp_path):
    path = tmp_path / "r.json"
    rc = cli.main(["bench", "--op", "VectorQuantizer-options", "--size", "tiny", "--case", "plain-eval", "--rounds", "1",
                   "--json", str(path)])
    assert rc == 0
    ops = {row["op"] for row in json.loads(path.read_text())["results"]}
    assert ops == {"VectorQuantizer-plain-eval"}
