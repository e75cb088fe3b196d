"""Quantizer ops and modules (vqdna.bench.cases): hrq_quantize against the two plain lookups it
contains and torch, ema_update (fast and deterministic) against torch index_add_, kmeans against
faiss (CPU), VectorQuantizer against vector-quantize-pytorch (eval and training forward), plainly and
with each of the peer's options (VectorQuantizer-options)."""

from bench._cases import parametrize_cases, run_impl


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, ["hrq_quantize", "ema_update", "kmeans", "VectorQuantizer", "VectorQuantizer-options"])


def test_quantizer(benchmark, case, impl):
    run_impl(benchmark, case, impl)
