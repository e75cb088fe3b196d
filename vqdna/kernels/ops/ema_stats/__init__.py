"""The ema_stats op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.ema_stats),
triton_kernel.py (its Triton backend, if any), bench.py (its benchmark cases); C++/CUDA in csrc/ops/ema_stats/."""
