"""The one tolerance table of the test suite.

Inputs are rounded to their dtype before the float64 truth is computed, so what a backend may get
wrong is only the float32 accumulation order (and, on GPUs, the tensor cores' accumulation). A
distance is therefore allowed an error of TOL[dtype] * scale, with scale = ||z||^2 + max_k ||e_k||^2
of that row (the size of the terms that cancel in ||e||^2 - 2 z.e + ||z||^2). Codes must be equal
to the reference wherever the best and second-best exact distances differ by more than twice that;
closer than that is a near-tie and either code may be chosen, as long as its exact distance is
within the tolerance of the true minimum.
"""

import torch

TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-5,
    torch.float16: 2e-5,
}

# Attention outputs (vqdna.models.bert) against the float32 reference softmax(QK^T/sqrt(d) + ALiBi + mask) V:
# absolute tolerance on outputs of O(1) inputs, per compute dtype (only summation order differs in float32).
ATTENTION_ATOL = {
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}

# stem (docs/design.md §2.5), keyed by the output dtype: |got - want| <= atol + rtol * |want| against the float64
# spec on the same parameters. The outputs are O(1) activations; float32 may differ by the float32
# accumulation order, rsqrt and erf (~1 ulp); bfloat16 / float16 add one rounding of that float32
# result (at most 2^-9 / 2^-12 relative; float16 subnormals absolute 2^-25), with a factor 2 margin.
STEM_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2**-8, 1e-5),
    torch.float16: (2**-11, 1e-5),
}

# VectorQuantizer against vector-quantize-pytorch (tests/models/test_quantizer_peer.py), float32, same
# weights and inputs, O(1) values: (rtol, atol) of outputs, losses, gradients and EMA state. The two
# differ only in summation order (the peer's one-hot einsums and cdist against the fused kernels) and
# in the rotation trick's forward (the peer recomputes q through the rotation: a few ulp).
PEER_PARITY_TOL = (1e-4, 1e-5)
