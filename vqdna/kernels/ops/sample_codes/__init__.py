"""The sample_codes op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.sample_codes),
triton_kernel.py (the GPU backend: Philox noise); C++ in csrc/ops/sample_codes/ (a CPU kernel: the torch RNG's draws)."""
