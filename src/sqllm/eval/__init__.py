"""Evaluation: perplexity, zero-shot tasks, inference benchmarks."""
