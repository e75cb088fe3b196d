"""The hrq_quantize op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.hrq_quantize),
triton_kernel.py (its Triton backend, if any), bench.py (its benchmark cases); C++/CUDA in csrc/ops/hrq_quantize/."""
