"""Training loops (stages 1-3)."""
