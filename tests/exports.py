"""A tiny export with untrained weights, written by the training job's own code (pipelines/inference/export.py):
for tests of what reads an export (evaluation, the MLflow model, refusals of damaged weights), not of training."""

from __future__ import annotations

from pathlib import Path


def write_untrained_export(root: Path, rows: int = 4, step: int = 1, run_name: str | None = None) -> Path:
    """root/features (synthetic features, `rows` rows) and root/model (the tiny preset's export); returns the latter."""
    from model.config import PRESETS
    from model.unet import UNet
    from pipelines.data.loader import read_manifest
    from pipelines.inference.draw import EncoderSources
    from pipelines.inference.export import ExportInfo, write_export
    from pipelines.synthetic.features import write_synthetic_features
    from pipelines.train.objective import ObjectiveConfig

    features = root / "features"
    manifest = write_synthetic_features(str(features), rows=rows)
    info = ExportInfo(weights="ema", step=step, schedule=ObjectiveConfig().schedule_config(),
                      encoders=EncoderSources.from_manifest(read_manifest(str(features))),
                      latent_shape=tuple(manifest.latent_shape), image_size=manifest.image_size,
                      scaling_factor=manifest.scaling_factor, shift_factor=manifest.shift_factor, train_config={},
                      run_name=run_name)
    write_export(str(root / "model"), PRESETS["tiny"], UNet(PRESETS["tiny"]).state_dict(), info, str(features),
                 manifest)
    return root / "model"
