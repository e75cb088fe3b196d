// Schema of the convnext_block op: `vqdna::convnext_block_native` on the CPU dispatch key (no CUDA
// kernel yet). The kernel registers with TORCH_LIBRARY_IMPL in cpu.cpp beside this file; the Python
// declaration is vqdna/kernels/ops/convnext_block/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // ConvNeXt block, channels-last, inference (no autograd): x [B, L, D] float32, keep [B, L] bool or None
  // (rows where it is False are written as zeros), the block's parameters as the nn.Module holds them
  // (dw_weight [D, 1, k], k odd; w1 [H, D]; w2 [D, H]); tile_rows: positions per task (0: 512).
  // Returns keep * (x + gamma * block(x)) [B, L, D].
  m.def("convnext_block_native(Tensor x, Tensor? keep, Tensor dw_weight, Tensor dw_bias, Tensor ln_weight, "
        "Tensor ln_bias, float ln_eps, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor gamma, int tile_rows=0) -> Tensor");
}

