"""`vqdna bench --op tokenize-rate` (vqdna/bench/tokenize_rate.py): the inputs it generates, and one tiny
case run end to end with both rows carrying bases/s and the ratio to one long record."""

import numpy as np

from vqdna.bench import cases
from vqdna.bench.measure import format_table
from vqdna.bench.runner import run_case
from vqdna.bench.tokenize_rate import write_fasta
from vqdna.data import read_fasta


def test_write_fasta_writes_the_lengths(tmp_path):
    lengths = np.array([1, 79, 80, 81, 250])
    write_fasta(str(tmp_path / "a.fa"), lengths, seed=0)
    recs = list(read_fasta(str(tmp_path / "a.fa")))
    assert [len(r.ids) for r in recs] == lengths.tolist() and all((r.ids < 4).all() for r in recs)


def test_tiny_case_tokenizes_short_records_and_one_record():
    found = list(cases.cases(["tokenize-rate"], "cpu", "tiny"))
    assert [c.shape["records"] for c in found] == ["100-300bp", "30bp"]
    rows = run_case(found[0], rounds=1)  # run() raises unless each tokenize wrote the case's bases
    assert [r["backend"] for r in rows] == ["vqdna", "one-record"] and rows[1]["kind"] == "peer"
    for r in rows:
        assert abs(r["bases_per_s"] * r["ms"] / 1e3 - found[0].bases) < 1e-6 * found[0].bases
    assert "vs one-record" in "\n".join(format_table(rows))
    assert not list(cases.cases(["tokenize-rate"], "cuda", "tiny"))
