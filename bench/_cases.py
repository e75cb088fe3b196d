"""Run one vqdna.bench case implementation as a pytest-benchmark test (shared by the bench files)."""

from __future__ import annotations

import pytest

from bench.conftest import bench_size, record, require_device, time_call
from vqdna.bench.cases import cases
from vqdna.kernels import dispatch


def case_params(ops, size: str):
    """(case, impl) params for `ops` on both devices; CUDA ones carry the `cuda` marker, CPU ones `cpu`."""
    params = []
    for device, mark in (("cpu", pytest.mark.cpu), ("cuda", pytest.mark.cuda)):
        for case in cases(ops, device, size):
            for impl in case.impl_names:
                params.append(pytest.param(case, impl, marks=mark, id=f"{case.id}-{impl.replace(' ', '_')}"))
    return params


def parametrize_cases(metafunc, ops) -> None:
    """Parametrize a test taking (case, impl) over the cases of `ops` at --vqdna-size."""
    if {"case", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize("case,impl", case_params(ops, bench_size(metafunc.config)))


def run_impl(benchmark, case, impl_name: str, rounds: int = 5):
    require_device(case.device)
    impls = {i.name: i for i in case.setup()}
    impl = impls[impl_name]
    benchmark.group = case.id
    seconds = time_call(benchmark, impl.fn, case.device, impl.rounds or rounds)
    if impl.kind == "backend" and case.table is not None:
        assert dispatch.last_backend(case.table["op"]) == impl.name, "the backend asked for is the one that ran"
    record(case.op, impl.name, case.device, case.dtype, case.shape, seconds, flops=case.flops, bytes_moved=case.bytes_moved,
           bases=case.bases, kind=impl.kind, table=case.table if impl.kind == "backend" else None)
