"""End to end: tokenizer encode (ids -> HRQ codes through the ConvNeXt encoder) in bases per second,
vqdna-small and vqdna-base configurations, auto backends against the reference (vqdna.bench.cases)."""

from bench._cases import parametrize_cases, run_impl


def pytest_generate_tests(metafunc):
    parametrize_cases(metafunc, ["tokenizer-encode"])


def test_tokenizer_encode(benchmark, case, impl):
    run_impl(benchmark, case, impl)
