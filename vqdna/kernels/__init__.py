"""vqdna kernels."""
