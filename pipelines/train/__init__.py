"""U-Net training: config, the Ray Train driver, the per-worker loop, the step, the objective, DeepSpeed, EMA,
checkpoints.
"""
