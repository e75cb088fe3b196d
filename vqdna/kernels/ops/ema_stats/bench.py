"""Benchmark cases of ema_update, the EMA codebook update on the ema_stats kernels (memory-bound: x and codes read once, the EMA state read and written) (`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import LOOKUP_GRID, ROWS, Case, Impl, backends_for, generator


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import ema_update, reference

    d = LOOKUP_GRID[size][0]
    points = [(n, 512) for n in ROWS[size]] + [(ROWS[size][-1], k) for k in ((4096,) if size == "tiny" else (4096, 65536))]
    for dtype in dtypes:
        for n, k in points:
            elt = torch.empty((), dtype=dtype).element_size()
            moved = n * d * elt + 4 * n + k * (d + 1) * 4 * 2 * 2 + k * d * elt
            case = Case("ema_update", device, dtype, {"N": n, "D": d, "K": k}, None, bytes_moved=moved,
                        table={"op": "ema_stats", "N": n, "K": k})
            backends = backends_for("ema_stats", device)
            case.impl_names = [n for b in backends for n in (b, f"{b} (deterministic)")] + ["torch index_add_"]

            def setup(n=n, k=k, dtype=dtype, backends=backends):
                gen = generator(device, n + k)
                x = torch.randn(n, d, generator=gen, device=device).to(dtype)
                codes = torch.randint(k, (n,), generator=gen, device=device, dtype=torch.int32)
                state = [torch.ones(k, device=device), torch.zeros(k, d, device=device), torch.zeros(k, d, device=device, dtype=dtype)]
                impls = []
                for b in backends:
                    for det in (False, True):
                        name = b if not det else f"{b} (deterministic)"
                        impls.append(Impl(name, (lambda b=b, det=det: ema_update(x, codes, *state, deterministic=det, backend=b)),
                                          kind="backend" if not det else "variant"))
                codes64 = codes.long()
                ones = torch.ones(n, device=device)

                def torch_ema():
                    counts = torch.zeros(k, device=device).index_add_(0, codes64, ones)
                    sums = torch.zeros(k, d, device=device).index_add_(0, codes64, x.float())
                    state[0].mul_(0.99).add_(counts, alpha=0.01)
                    state[1].mul_(0.99).add_(sums, alpha=0.01)
                    state[2].copy_(state[1] / reference.laplace_smoothed(state[0], reference.EMA_EPS)[:, None])

                impls.append(Impl("torch index_add_", torch_ema, kind="peer"))
                return impls

            case.setup = setup
            yield case
