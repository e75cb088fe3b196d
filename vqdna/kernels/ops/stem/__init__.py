"""The stem op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.stem),
triton_kernel.py (its Triton backend, if any), bench.py (its benchmark cases); C++/CUDA in csrc/ops/stem/."""
