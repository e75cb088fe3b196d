"""Benchmark cases of kmeans (assignment-bound: iters x 2 N K D FLOPs) (`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import CPU_REF_FLOPS, LOOKUP_GRID, Case, Impl, backends_for, cpu_budget, has_module, near_codes


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import kmeans

    iters = 5
    d = LOOKUP_GRID[size][0]
    points = {"tiny": [(4096, 64)], "small": [(16384, 512), (65536, 512)], "full": [(1 << 16, 512), (1 << 20, 512), (1 << 20, 4096)]}[size]
    for dtype in dtypes:
        if dtype != torch.float32:
            continue  # k-means runs on float32 features (codebook initialisation)
        for n, k in points:
            flops = iters * 2.0 * n * k * d
            case = Case("kmeans", device, dtype, {"N": n, "D": d, "K": k, "iters": iters}, None, flops=flops)
            backends = backends_for("lookup", device)
            if not cpu_budget(device, flops, CPU_REF_FLOPS):
                backends = [b for b in backends if b != "reference"]
                case.skipped.append("reference: above the CPU reference budget")

            faiss_ok = torch.device(device).type == "cpu" and has_module("faiss")
            case.impl_names = [*backends, *(["faiss"] if faiss_ok else [])]

            def setup(n=n, k=k, backends=backends, faiss_ok=faiss_ok):
                x, _ = near_codes(n, k, d, torch.float32, device, seed=n + k)
                impls = [Impl(b, (lambda b=b: kmeans(x, k, iters, init="random", backend=b)), rounds=2 if b == "reference" else 3) for b in backends]
                if faiss_ok:
                    import faiss

                    xn = x.numpy()

                    def faiss_kmeans():
                        km = faiss.Kmeans(d, k, niter=iters, seed=0, max_points_per_centroid=1 << 30, spherical=False)
                        km.train(xn)

                    impls.append(Impl("faiss", faiss_kmeans, kind="peer", rounds=3))
                return impls

            case.setup = setup
            yield case
