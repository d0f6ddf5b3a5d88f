"""Clipping: per-example norms, per-group factors and clipped sums, and how each layer makes them."""
