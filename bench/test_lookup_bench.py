"""lookup: every backend x dtype over the VQ and large-K sizes (vqdna.bench.cases), against torch
addmm+argmin and faiss IndexFlatL2 (CPU, when installed); GFLOP/s = 2 N K D / time."""

from bench._cases import parametrize_cases, run_impl


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, ["lookup"])


def test_lookup(benchmark, case, impl):
    run_impl(benchmark, case, impl)
