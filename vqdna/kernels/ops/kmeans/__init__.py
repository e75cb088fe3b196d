"""The kmeans op, a composite of lookup and ema_stats: declaration.py (no torch op of its own),
wrapper.py (vqdna.kernels.kmeans), bench.py (its benchmark cases)."""
