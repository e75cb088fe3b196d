"""Benchmark cases of stem (memory-bound: ids read once, [N, D] features written once) (`vqdna bench`; named by the op's declaration)."""

from __future__ import annotations

from typing import Iterator

import torch

from vqdna.bench.cases import LOOKUP_GRID, Case, Impl, backends_for, generator


def cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import stem
    d = LOOKUP_GRID[size][0]
    rows = {"tiny": [(1, 4096)], "small": [(8, 4096), (64, 4096)], "full": [(16, 4096), (256, 4096), (1024, 16384)]}[size]
    for dtype in dtypes:
        for b, length in rows:
            n = b * length
            elt = torch.empty((), dtype=dtype).element_size()
            case = Case("stem", device, dtype, {"B": b, "L": length, "D": d}, None, bytes_moved=n + n * d * elt,
                        table={"op": "stem", "N": n, "K": d})
            backends = backends_for("stem", device)
            case.impl_names = [*backends, "torch"]

            def setup(b=b, length=length, dtype=dtype, backends=backends):
                gen = generator(device, b)
                ids = torch.randint(5, (b, length), generator=gen, device=device, dtype=torch.uint8)
                w = torch.randn(d, 5, 5, generator=gen, device=device) / 5
                bias, lw, lb = (torch.randn(d, generator=gen, device=device) for _ in range(3))
                args = [t.to(dtype) for t in (w, bias, lw, lb)]
                impls = [Impl(bk, (lambda bk=bk: stem(ids, *args, out_dtype=dtype, backend=bk)),
                              rounds=2 if bk == "reference" else None) for bk in backends]

                def torch_stem():  # what a user writes: Conv1d over the one-hot, LayerNorm, GELU
                    x = torch.nn.functional.one_hot(ids.long(), 6)[..., :5].transpose(1, 2).to(dtype)
                    y = torch.nn.functional.conv1d(x, args[0], args[1], padding=2).transpose(1, 2)
                    return torch.nn.functional.gelu(torch.nn.functional.layer_norm(y, (d,), args[2], args[3], 1e-6))

                impls.append(Impl("torch", torch_stem, kind="peer"))
                return impls

            case.setup = setup
            yield case
