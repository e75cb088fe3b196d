"""quantize (docs/design.md §2.1): the nearest code of every row, the chosen rows, the commitment-loss sum
and the non-finite rows, in one pass; differentiable (straight-through + commitment gradient to z)."""
