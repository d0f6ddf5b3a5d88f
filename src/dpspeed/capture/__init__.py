"""Capture: record, without wrapping the model, what clipping needs (each bound module's inputs in
the forward pass and output gradients in the backward pass)."""
