"""`vqdna bench --op encode-rate` (vqdna/bench/encode_rate.py): the FLOP count, and one tiny case run
end to end with its rows carrying bases/s, GFLOP/s and the ratio to the same-FLOP GEMM."""

from vqdna.bench import cases
from vqdna.bench.encode_rate import encoder_flops_per_base
from vqdna.bench.measure import format_table
from vqdna.bench.runner import run_case
from vqdna.models.tokenizer_model import VQDNATokenizerConfig


def test_flops_per_base_is_the_issue_count():
    # 4 blocks x (2 x 64 x 256 x 2 + 7 x 64 x 2) + 64 x 64 x 2 + 256 x 64 x 2 (issue 17)
    want = 4 * (2 * 64 * 256 * 2 + 7 * 64 * 2) + (64 + 256) * 64 * 2
    assert encoder_flops_per_base(VQDNATokenizerConfig.named("vqdna-small")) == want


def test_tiny_case_reports_bases_flops_and_gemm_ratio():
    found = [c for c in cases.cases(["encode-rate"], "cpu", "tiny") if c.shape["config"] == "vqdna-small"]
    assert [c.shape["threads"] for c in found] == [1, 2]
    rows = run_case(found[0], rounds=1)
    assert [r["backend"] for r in rows] == ["vqdna", "vqdna-unfused-blocks", "reference", "fp32-gemm"]
    for r in rows:
        assert r["gflops"] > 0 and r["fraction_of_peak"] > 0
        assert abs(r["bases_per_s"] * r["ms"] / 1e3 - found[0].bases) < 1e-6 * found[0].bases
    table = "\n".join(format_table(rows))
    assert "vs fp32-gemm" in table and "Mbase/s" in table
