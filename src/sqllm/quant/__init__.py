"""Quantization algorithms: pure functions on one weight matrix (plus its statistics) -> codes."""
