"""Benchmark cases of hrq_quantize (`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import (
    CPU_REF_FLOPS,
    CPU_TORCH_BF16_FLOPS,
    HRQ_SIZES,
    LOOKUP_GRID,
    ROWS,
    Case,
    Impl,
    backends_for,
    cpu_budget,
    generator,
)


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import hrq_quantize, lookup

    d = LOOKUP_GRID[size][0]
    for dtype in dtypes:
        for n in ROWS[size]:
            flops = 2.0 * n * d * sum(HRQ_SIZES)
            case = Case("hrq_quantize", device, dtype, {"N": n, "D": d, "K": list(HRQ_SIZES)}, None, flops=flops,
                        table={"op": "hrq_quantize", "N": n, "K": sum(HRQ_SIZES)})
            backends = backends_for("hrq_quantize", device)
            if not cpu_budget(device, flops, CPU_REF_FLOPS):
                backends = [b for b in backends if b != "reference"]
                case.skipped.append("reference: above the CPU reference budget")
            torch_ok = dtype == torch.float32 or cpu_budget(device, flops, CPU_TORCH_BF16_FLOPS)
            fast = next((b for b in backends if b != "reference"), None)
            reuse = "native" in backends  # out= buffers reused across calls: no fresh-page cost per call
            variants = [f"{fast} (losses)", f"{fast} (codes only)"] if fast else []
            case.impl_names = [*backends, *(["native (out=)"] if reuse else []), *variants,
                               *([f"2x lookup ({fast})"] if fast else []), *(["torch"] if torch_ok else [])]

            def setup(n=n, dtype=dtype, backends=backends, torch_ok=torch_ok, fast=fast, reuse=reuse):
                gen = generator(device, n)
                cbs = [torch.randn(k, d, generator=gen, device=device).to(dtype) for k in HRQ_SIZES]
                zs = [torch.randn(n, d, generator=gen, device=device).to(dtype) for _ in HRQ_SIZES]
                impls = [
                    Impl(b, (lambda b=b: hrq_quantize(zs, cbs, backend=b)), rounds=2 if b == "reference" else None)
                    for b in backends
                ]
                if reuse:
                    out = (torch.empty(len(HRQ_SIZES), n, dtype=torch.int32), torch.empty(len(HRQ_SIZES), n, d, dtype=dtype))
                    impls.append(Impl("native (out=)", lambda: hrq_quantize(zs, cbs, backend="native", out=out), kind="variant"))
                if fast is not None:
                    # HRQuantizer's call (the per-level loss sums and finite report too) and encode's.
                    impls.append(Impl(f"{fast} (losses)", lambda: hrq_quantize(zs, cbs, backend=fast, losses=True),
                                      kind="variant"))
                    impls.append(Impl(f"{fast} (codes only)", lambda: hrq_quantize(zs, cbs, backend=fast, codes_only=True),
                                      kind="variant"))
                    # The cost floor of fused HRQ: the two plain lookups it contains, H_2 given free.
                    h2 = 2 * zs[1] - cbs[0][torch.randint(HRQ_SIZES[0], (n,), generator=gen, device=device)]
                    impls.append(Impl(f"2x lookup ({fast})", lambda: (lookup(zs[0], cbs[0], backend=fast), lookup(h2, cbs[1], backend=fast)), kind="peer"))
                if torch_ok:
                    sqs = [c.float().pow(2).sum(-1).to(dtype) for c in cbs]

                    def torch_hrq():
                        m1 = torch.addmm(sqs[0], zs[0], cbs[0].T, alpha=-2).argmin(1)
                        h = 2 * zs[1] - cbs[0][m1]
                        m2 = torch.addmm(sqs[1], h, cbs[1].T, alpha=-2).argmin(1)
                        return m1, m2, (cbs[0][m1] + cbs[1][m2]) / 2

                    impls.append(Impl("torch", torch_hrq, kind="peer"))
                return impls

            case.setup = setup
            yield case
