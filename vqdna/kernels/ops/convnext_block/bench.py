"""Benchmark cases of convnext_block (two [N, D] x [D, 4D] GEMMs a block, the rest memory-bound)
(`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import LOOKUP_GRID, Case, Impl, backends_for, generator


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import convnext_block
    from vqdna.models.convnext import ConvNeXtBlock1d

    d = LOOKUP_GRID[size][0]
    rows = {"tiny": [(1, 4096)], "small": [(8, 4096)], "full": [(16, 4096), (256, 4096)]}[size]
    for dtype in dtypes:
        for b, length in rows:
            n, h = b * length, 4 * d
            case = Case("convnext_block", device, dtype, {"B": b, "L": length, "D": d}, None,
                        flops=4.0 * n * d * h, table={"op": "convnext_block", "N": n, "K": d})
            backends = backends_for("convnext_block", device)
            if dtype != torch.float32 and "native" in backends:  # the native kernel is float32 only
                backends.remove("native")
                case.skipped.append("native: float32 only")
            case.impl_names = [*backends, "torch"]

            def setup(b=b, length=length, dtype=dtype, backends=backends):
                torch.manual_seed(b)
                block = ConvNeXtBlock1d(d, layer_scale_init=1.0).to(device=device, dtype=dtype).eval()
                x = torch.randn(b, length, d, generator=generator(device, b), device=device).to(dtype)
                keep = torch.ones(b, length, dtype=torch.bool, device=device)

                def run(bk):
                    with torch.no_grad():
                        return convnext_block(x, keep, *block._params(), ln_eps=block.norm.eps, backend=bk)

                def module():  # what a user writes: the nn.Module, masked
                    with torch.no_grad():
                        return block(x) * keep[..., None].to(dtype)

                impls = [Impl(bk, (lambda bk=bk: run(bk)), rounds=2 if bk == "reference" else None) for bk in backends]
                impls.append(Impl("torch", module, kind="peer"))
                return impls

            case.setup = setup
            yield case
