"""Python side of the compiled ops in vqdna._C (csrc/): fake (meta) implementations so
torch.compile and torch.export can trace them. The kernels themselves are C++ (cpu/*.cpp) and
CUDA (cuda/*.cu); their schemas live in csrc/vqdna.cpp."""

from __future__ import annotations

import torch

from vqdna import _ext

_DISPATCH_KEY = {"native": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, backend: str) -> bool:
    """True when vqdna._C registered a kernel for `vqdna::<op>_<backend>` (native: CPU, cuda: CUDA)."""
    if not _ext.extension_available():
        return False
    name = f"vqdna::{op}_{backend}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, _DISPATCH_KEY[backend])
    except RuntimeError:  # the schema is unknown to this (older) build
        return False


if _ext.extension_available():

    def _lookup_fake(z, codebook, codebook_sqnorm):
        n = z.shape[0]
        return z.new_empty(n, dtype=torch.int32), z.new_empty(n, dtype=torch.float32)


    def _hrq_fake(zs, codebooks, codebook_sqnorms, codebook_sizes):
        n, d = zs[0].shape
        return zs[0].new_empty(len(zs), n, dtype=torch.int32), zs[0].new_empty(len(zs), n, d)

    def _ema_stats_fake(x, codes, mask, prev_codes, prev_codebook, num_codes, deterministic):
        return x.new_empty(num_codes, dtype=torch.float32), x.new_empty(num_codes, x.shape[1], dtype=torch.float32)

    def _stem_fake(ids, weight, bias, ln_weight, ln_bias, ln_eps, out_dtype):
        return weight.new_empty(ids.shape[0], ids.shape[1], weight.shape[0], dtype=out_dtype)

    for _op, _fake in (
        ("lookup", _lookup_fake), ("hrq_quantize", _hrq_fake), ("ema_stats", _ema_stats_fake), ("stem", _stem_fake),
    ):
        for _backend in ("native", "cuda"):
            if has_kernel(_op, _backend):
                torch.library.register_fake(f"vqdna::{_op}_{_backend}")(_fake)

    if has_kernel("hrq_quantize", "native"):

        @torch.library.register_fake("vqdna::hrq_quantize_native_out")
        def _hrq_out_fake(zs, codebooks, codebook_sqnorms, codebook_sizes, codes, zhat_levels):
            return None
