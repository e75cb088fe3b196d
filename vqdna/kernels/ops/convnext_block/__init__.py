"""The convnext_block op: declaration.py (what registers and dispatches it), wrapper.py
(vqdna.kernels.convnext_block), bench.py (its benchmark cases); its native CPU kernel in
csrc/ops/convnext_block/. No Triton or CUDA backend yet: on a GPU it runs the reference."""
