"""Benchmark cases of lookup (compute-bound: 2 N K D FLOPs) (`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import (
    CPU_REF_FLOPS,
    CPU_TORCH_BF16_FLOPS,
    LOOKUP_GRID,
    MATERIALISE_BYTES,
    Case,
    Impl,
    backends_for,
    cpu_budget,
    has_module,
    near_codes,
)


def _lookup_case(n, k, d, dtype, device) -> Case:
    from vqdna.kernels import lookup

    flops = 2.0 * n * k * d
    case = Case("lookup", device, dtype, {"N": n, "K": k, "D": d}, None, flops=flops, table={"op": "lookup", "N": n, "K": k})
    backends = backends_for("lookup", device)
    if not cpu_budget(device, flops, CPU_REF_FLOPS) and "reference" in backends:
        backends.remove("reference")
        case.skipped.append("reference: above the CPU reference budget")
    torch_ok = n * k * 4 <= MATERIALISE_BYTES[torch.device(device).type]
    if not torch_ok:
        case.skipped.append("torch: the N x K matrix it builds is too large here")
    elif dtype != torch.float32 and not cpu_budget(device, flops, CPU_TORCH_BF16_FLOPS):
        torch_ok = False
        case.skipped.append("torch: above the CPU budget for its half-precision GEMM")
    faiss_ok = torch.device(device).type == "cpu" and dtype == torch.float32 and has_module("faiss")
    case.impl_names = [*backends, *(["torch"] if torch_ok else []), *(["faiss"] if faiss_ok else [])]

    def setup():
        z, codebook = near_codes(n, k, d, dtype, device, seed=k + n)
        sq = codebook.float().pow(2).sum(-1)
        impls = [
            Impl(b, (lambda b=b: lookup(z, codebook, codebook_sqnorm=sq, backend=b)), rounds=2 if b == "reference" else None)
            for b in backends
        ]
        if torch_ok:
            sq_t = sq.to(dtype)
            impls.append(Impl("torch", lambda: torch.addmm(sq_t, z, codebook.T, alpha=-2).argmin(1), kind="peer"))
        if faiss_ok:
            import faiss

            index = faiss.IndexFlatL2(d)
            index.add(codebook.numpy())
            zn = z.numpy()
            impls.append(Impl("faiss", lambda: index.search(zn, 1), kind="peer"))
        return impls

    case.setup = setup
    return case


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    d, ns, k_ref, ks, n_of_ks = LOOKUP_GRID[size]
    points = [(n, k_ref) for n in ns] + [(n_of_ks, k) for k in ks if k != k_ref]
    for dtype in dtypes:
        for n, k in points:
            yield _lookup_case(n, k, d, dtype, device)
