"""kmeans (docs/design.md §2.4): a composite of `lookup` (assign) and `ema_stats` (update) on whichever backend
runs them; no torch op of its own. Declaration: see vqdna/kernels/ops/registry.py."""

from vqdna.kernels.ops.registry import OpDeclaration

DECLARATION = OpDeclaration(
    name="kmeans", compiled=(), uses=("lookup", "ema_stats"), bench=("kmeans", "vqdna.kernels.ops.kmeans.bench:cases")
)
