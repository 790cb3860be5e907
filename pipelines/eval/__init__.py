"""Batch sampling evaluation: the driver, prompts, outputs and metrics (CLIP score, FID)."""
