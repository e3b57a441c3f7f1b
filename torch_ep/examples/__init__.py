"""Runnable examples: `python -m torch_ep.examples.train` trains a small MoE transformer (see docs/training.md)."""
