"""`vqdna bench --op encode-rate`: the tokenizer's `model.encode` on the CPU (the stage-1 encoder up to
its last tap and the codebook lookups) in bases/s and encoder GFLOP/s, against a float32 GEMM of the
encoder's own pointwise shapes doing the same FLOPs, timed interleaved in the same run and on the same
thread count, so `vs fp32-gemm` is the fraction of the machine's GEMM rate that encode reaches.

Encoder FLOPs per base (the issue-17 count): depth x (2 x D x H x 2 + k x D x 2) for the blocks
(pointwise GEMMs, depthwise taps; H = mlp_ratio x D) plus sum_l K_l x D x 2 for the lookups. The stem
(a gather, no multiplies) and elementwise work (LayerNorm, GELU) are not counted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import torch

from vqdna.bench.cases import Case, Impl, _env, generator, left_out
from vqdna.models import convnext


def encoder_flops_per_base(config) -> float:
    """FLOPs of encode per base for a VQDNATokenizerConfig (see the module docstring)."""
    d, h = config.dim, config.mlp_ratio * config.dim
    blocks = config.taps[-1] * (2 * d * h * 2 + config.kernel_size * d * 2)
    return float(blocks + sum(config.codebook_sizes) * d * 2)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode_rate_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    """CPU float32 cases (config, B, L, threads); L is the tokenizer's default window (8192 bases) plus
    its halo, B its default CPU batch (8 windows) for vqdna-small and one window for vqdna-base."""
    if torch.device(device).type != "cpu" or torch.float32 not in dtypes:
        left_out.append(f"encode-rate: CPU float32 only (asked for {device}, {[str(d)[6:] for d in dtypes]})")
        return
    from vqdna.models.tokenizer_model import VQDNATokenizerConfig, VQDNATokenizerModel

    points = {
        "tiny": [("vqdna-small", 2, 1052), ("vqdna-base", 1, 1044)],
        "small": [("vqdna-small", 8, 8220), ("vqdna-base", 1, 8232)],
        "full": [("vqdna-small", 8, 8220), ("vqdna-base", 8, 8232)],
    }[size]
    for name, b, length in points:
        config = VQDNATokenizerConfig.named(name)
        flops = encoder_flops_per_base(config) * b * length
        for threads in (1, 2):
            shape = {"config": name, "B": b, "L": length, "threads": threads}
            case = Case("encode-rate", device, torch.float32, shape, None, flops=flops, bases=b * length)
            case.impl_names = ["vqdna", "vqdna-unfused-blocks", "reference", "fp32-gemm"]

            def setup(config=config, b=b, length=length, threads=threads, flops=flops):
                model = VQDNATokenizerModel(config).eval()
                ids = torch.randint(5, (b, length), generator=generator(device, 3))
                mask = ids < 5

                def encode(backend=None):
                    with _threads(threads), _env("VQDNA_BACKEND", backend):
                        model.encode(ids, mask)

                # The peer: the encoder's pointwise GEMM pair [M, D] x [D, H], [M, H] x [H, D], once per
                # block, with M chosen so that its FLOPs equal the encoder's count.
                d, h, depth = config.dim, config.mlp_ratio * config.dim, config.taps[-1]
                m = max(1, round(flops / (depth * 4 * d * h)))
                gen = generator(device, 4)
                a, w1t, w2t = (torch.randn(*s, generator=gen) for s in ((m, d), (d, h), (h, d)))
                hid, out = torch.empty(m, h), torch.empty(m, d)

                def gemm():
                    with _threads(threads):
                        for _ in range(depth):
                            torch.mm(a, w1t, out=hid)
                            torch.mm(hid, w2t, out=out)

                def unfused():  # encode as before the fused block: the module's ops, native lookups
                    with mock.patch.object(convnext, "_fused_applies", lambda x: False):
                        encode()

                return [
                    Impl("vqdna", encode, rounds=3),
                    Impl("vqdna-unfused-blocks", unfused, rounds=3),
                    Impl("reference", lambda: encode("reference"), rounds=1),
                    Impl("fp32-gemm", gemm, kind="peer", rounds=3),
                ]

            case.setup = setup
            yield case
