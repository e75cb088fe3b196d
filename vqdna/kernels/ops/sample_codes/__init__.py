"""The sample_codes op: declaration.py (what registers and dispatches it), wrapper.py (vqdna.kernels.sample_codes);
C++ in csrc/ops/sample_codes/ (a CPU kernel only: on CUDA the reference's torch ops run)."""
