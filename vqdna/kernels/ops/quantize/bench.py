"""Benchmark cases of quantize (`vqdna bench --op quantize`; named by the op's declaration): the op's
backends beside the bare `lookup` of the same problem and `VectorQuantizer`'s eval forward, in one run
(issue 17's target: the module's eval forward within 1.15x of the bare lookup)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import CPU_REF_FLOPS, LOOKUP_GRID, Case, Impl, backends_for, cpu_budget, near_codes


def _quantize_case(n, k, d, dtype, device) -> Case:
    from vqdna import VectorQuantizer
    from vqdna.kernels import lookup, quantize

    flops = 2.0 * n * k * d
    case = Case("quantize", device, dtype, {"N": n, "K": k, "D": d}, None, flops=flops, table={"op": "quantize", "N": n, "K": k})
    backends = backends_for("quantize", device)
    if not cpu_budget(device, flops, CPU_REF_FLOPS) and "reference" in backends:
        backends.remove("reference")
        case.skipped.append("reference: above the CPU reference budget")
    fast = backends_for("lookup", device)[0]
    case.impl_names = [*backends, f"lookup-{fast}", *(["VectorQuantizer-eval"] if dtype == torch.float32 else [])]

    def setup():
        z, codebook = near_codes(n, k, d, dtype, device, seed=k + n)
        sq = codebook.float().pow(2).sum(-1)
        module = VectorQuantizer(dim=d, codebook_size=k).to(device).eval()
        with torch.no_grad():
            module.codebook.copy_(codebook.float())

        def module_eval():
            with torch.no_grad():
                module(z)

        impls = [
            Impl(b, (lambda b=b: quantize(z, codebook, codebook_sqnorm=sq, backend=b)), rounds=2 if b == "reference" else None)
            for b in backends
        ]
        impls.append(Impl(f"lookup-{fast}", lambda: lookup(z, codebook, codebook_sqnorm=sq, backend=fast)))
        if dtype == torch.float32:  # the module's input dtype here: float32 (its codebook buffer is float32)
            impls.append(Impl("VectorQuantizer-eval", module_eval))
        return impls

    case.setup = setup
    return case


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    d, k = LOOKUP_GRID[size][0], 512
    n = {"tiny": 4096, "small": 65536, "full": 1 << 20}[size]
    for dtype in dtypes:
        yield _quantize_case(n, k, d, dtype, device)
