"""The lookup op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.lookup),
triton_kernel.py (its Triton backend, if any), bench.py (its benchmark cases); C++/CUDA in csrc/ops/lookup/."""
