"""Python side of the compiled ops in vqdna._C (csrc/): fake (meta) implementations so
torch.compile and torch.export can trace them. The kernels themselves are C++ (cpu/*.cpp) and
CUDA (cuda/*.cu); their schemas live in csrc/vqdna.cpp."""

from __future__ import annotations

import torch

from vqdna import _ext

if _ext.extension_available():

    def _lookup_fake(z, codebook, codebook_sqnorm):
        n = z.shape[0]
        return z.new_empty(n, dtype=torch.int32), z.new_empty(n, dtype=torch.float32)

    torch.library.register_fake("vqdna::lookup_native")(_lookup_fake)
    torch.library.register_fake("vqdna::lookup_cuda")(_lookup_fake)
