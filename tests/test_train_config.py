"""The training config: shipped YAML files, fingerprints, driver-side validation; the tracker; the export format.
No Ray here (fast)."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from model.config import PRESETS
from model.samplers import SamplerConfig
from pipelines.core.config import ConfigError, config_differences, from_dict, load_config
from pipelines.core.tracking import MLflowSettings, Tracker
from pipelines.train.config import TrainConfig, fingerprint, validate_for_launch
from pipelines.train.deepspeed_config import derive_batch_sizes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIGS = ["tiny-cpu.yaml", "sd2-base-256.yaml", "sd2-base-512.yaml", "sd15-finetune.yaml"]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_train_configs_load_and_their_batches_divide(name):
    cfg = load_config(TrainConfig, CONFIGS / name)
    micro, accum = derive_batch_sizes(cfg.batch.global_batch, cfg.scaling.num_workers, cfg.batch.micro_batch)
    assert micro * accum * cfg.scaling.num_workers == cfg.batch.global_batch
    cfg.lr_schedule(), cfg.ema_config(), cfg.objective.noise_schedule()
    if cfg.model.init_from is None:
        assert cfg.model.unet_config().sample_size in (8, 32, 64)  # tiny-cpu: 32 px; sd2-base-256; sd15
    else:
        assert cfg.model.preset in PRESETS


def test_gpu_configs_use_bf16_v_prediction_min_snr_and_ema():
    for name in ("sd2-base-256.yaml", "sd2-base-512.yaml"):
        cfg = load_config(TrainConfig, CONFIGS / name)
        assert cfg.deepspeed.precision == "bf16" and cfg.scaling.use_gpu
        assert cfg.objective.prediction_type == "v" and cfg.objective.min_snr_gamma == 5.0
        assert cfg.ema.enabled and cfg.ema.max_decay == 0.9999
    assert load_config(TrainConfig, CONFIGS / "sd2-base-256.yaml").model.unet_config().sample_size == 32


def test_fingerprint_ignores_resumable_settings_and_names_real_changes():
    base = load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml")
    same = load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml",
                       ["max_steps=5000", "log_every=1", "checkpoint.every_steps=7", "mlflow.experiment=x",
                        "samples.every_steps=3"])
    assert config_differences(fingerprint(base), fingerprint(same)) == []
    other = load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["deepspeed.adamw.lr=0.5", "model.overrides.norm_groups=8"])
    changes = config_differences(fingerprint(base), fingerprint(other))
    assert any(c.startswith("deepspeed.adamw.lr:") for c in changes)
    assert any(c.startswith("model.unet.norm_groups:") for c in changes)


def test_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="features_dir"):
        validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", [f"features_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["model.preset=huge"]).model.unet_config()
    with pytest.raises(ConfigError, match="model.overrides"):
        load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["model.overrides={channels: 3}"]).model.unet_config()
    with pytest.raises(ConfigError, match="deepspeed.precision"):
        load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["deepspeed.precision=fp8"])
    with pytest.raises(ConfigError, match="max_steps"):
        validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["max_steps=0"]))
    with pytest.raises(ConfigError, match="model.compile: 'inductr' is not a torch.compile backend"):
        validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["model.compile=inductr"]))
    with pytest.raises(ConfigError, match="scaling.placement_strategy must be one of PACK, SPREAD"):
        load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", ["scaling.placement_strategy=spread"])


# ------------------------------------------------------------------------------- tracker


def test_tracker_finds_its_run_again_and_keeps_params(tmp_path):
    from mlflow import MlflowClient

    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'db.sqlite'}", experiment="e", system_metrics=False)
    first = Tracker.open(settings, "run-a", tags={"k": "v"})
    first.log_params({"a": 1, "b": "x"})
    first.log_metrics({"loss": 0.5}, step=1)
    again = Tracker.open(settings, "run-a")
    again.log_params({"a": 1, "c": 2})  # a resume logs the same params again: not an error
    other = Tracker.open(settings, "run-b")
    assert again.run_id == first.run_id != other.run_id
    run = MlflowClient(settings.tracking_uri).get_run(first.run_id)
    assert run.data.params == {"a": "1", "b": "x", "c": "2"} and run.data.tags["k"] == "v"
    experiment = MlflowClient(settings.tracking_uri).get_experiment_by_name("e")
    assert experiment.artifact_location.endswith(str(tmp_path / "mlartifacts"))


def test_evaluation_run_nests_under_its_training_run_or_gets_a_new_run_when_the_store_lacks_it(tmp_path, caplog):
    from mlflow import MlflowClient

    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'db.sqlite'}", experiment="e", system_metrics=False)
    training = Tracker.open(settings, "train")
    child = Tracker.open_child(settings, "eval", training.run_id)
    client = MlflowClient(settings.tracking_uri)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == training.run_id
    # A training run of another store (a job that runs without MLFLOW_TRACKING_URI in a temporary copy):
    # the evaluation still gets a run, top level, and the log says which store lacked the parent and why.
    elsewhere = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'other.sqlite'}", experiment="e",
                               system_metrics=False)
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        orphan = Tracker.open_child(elsewhere, "eval", training.run_id)
    assert orphan.run_id is not None and orphan.failures == 0
    assert "mlflow.parentRunId" not in MlflowClient(elsewhere.tracking_uri).get_run(orphan.run_id).data.tags
    assert any(training.run_id in r.getMessage() and "MLFLOW_TRACKING_URI" in r.getMessage() for r in caplog.records)


def test_tracker_with_the_server_down_warns_once_and_goes_on(caplog):
    settings = MLflowSettings(tracking_uri="http://127.0.0.1:9", experiment="e", http_retries=0, http_timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        tracker = Tracker.open(settings, "run")
        tracker.log_metrics({"loss": 1.0}, step=1)  # inactive: no run id
        tracker.run_id = "made-up"
        tracker.log_metrics({"loss": 1.0}, step=2)  # within the cool-down: skipped, no second warning
    warnings = [r for r in caplog.records if "failed to" in r.getMessage()]
    assert len(warnings) == 1 and tracker.failures == 1


# ------------------------------------------------------------------------------- export format


def test_export_round_trip_and_incomplete_directory(tmp_path):
    from model.unet import UNet
    from pipelines.data.loader import read_manifest
    from pipelines.inference.draw import EncoderSources
    from pipelines.inference.export import INDEX_FILE, ExportInfo, load_exported, write_export
    from pipelines.synthetic.features import write_synthetic_features

    features = tmp_path / "features"
    manifest = write_synthetic_features(str(features), rows=4)
    unet_cfg = PRESETS["tiny"]
    weights = UNet(unet_cfg).state_dict()
    info = ExportInfo(weights="ema", step=3, schedule=from_dict(TrainConfig, {}).objective.schedule_config(),
                      encoders=EncoderSources.from_manifest(read_manifest(str(features))),
                      latent_shape=tuple(manifest.latent_shape), image_size=manifest.image_size,
                      scaling_factor=manifest.scaling_factor, shift_factor=manifest.shift_factor, train_config={},
                      sampling=SamplerConfig())
    out = tmp_path / "model"
    write_export(str(out), unet_cfg, weights, info, str(features), manifest)
    write_export(str(out), unet_cfg, weights, info, str(features), manifest)  # replacing an export works
    model = load_exported(out)
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in weights.items())
    assert model.empty_caption[0].shape == tuple(manifest.text_shape) and model.index["step"] == 3
    vae, text = model.encoders.build()
    assert vae.id == manifest.vae["id"] and text.id == manifest.text_encoder["id"]
    (out / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        load_exported(out)


# ------------------------------------------------------------------------------- init_from / resume_from at URIs


@pytest.fixture
def memory_root():
    """A fresh folder on fsspec's memory:// filesystem: a location that is no local path (as s3:// is not)."""
    import uuid

    from pipelines.core import storage

    root = f"memory://test-train-config-{uuid.uuid4().hex}"
    yield root
    storage.remove_dir(root)


def _upload(local_dir: Path, location: str) -> None:
    from pipelines.core import storage

    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(location, path.relative_to(local_dir).as_posix()), path.read_bytes())


def test_init_from_reads_a_saved_unet_at_a_uri(memory_root, tmp_path, micro_cfg):
    from model.unet import UNet
    from pipelines.train.checkpoint import pretrained_weights
    from pipelines.train.config import ModelSettings

    saved = UNet(micro_cfg)
    saved.save_pretrained(tmp_path / "unet")
    location = f"{memory_root}/runs/phase-1/export/unet"
    _upload(tmp_path / "unet", location)
    settings = ModelSettings(preset="sd2-base", init_from=location, overrides={"sample_size": 16})
    assert settings.unet_config() == dataclasses.replace(micro_cfg, sample_size=16)  # its config, then overrides
    weights = pretrained_weights(location)  # what each worker loads into its U-Net
    assert weights.keys() == saved.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in saved.state_dict().items())


def test_init_from_and_resume_from_at_uris_are_checked_before_launch(memory_root, tmp_path, micro_cfg):
    import re

    from model.unet import UNet
    from pipelines.core import storage

    def launch(*overrides):
        return validate_for_launch(load_config(TrainConfig, CONFIGS / "tiny-cpu.yaml", list(overrides)))

    missing = f"{memory_root}/nowhere"
    with pytest.raises(ConfigError, match=re.escape(f"model.init_from: {missing}/config.json not found")) as err:
        launch(f"model.init_from={missing}")
    assert "\n" not in str(err.value)
    UNet(micro_cfg).save_pretrained(tmp_path / "unet")
    location = f"{memory_root}/export/unet"
    _upload(tmp_path / "unet", location)
    storage.remove(f"{location}/model.safetensors")  # an interrupted copy: the config without the weights
    with pytest.raises(ConfigError, match=re.escape(f"model.init_from: {location}/model.safetensors not found")):
        launch(f"model.init_from={location}")
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint.resume_from: {missing} does not exist")):
        launch(f"checkpoint.resume_from={missing}")


def test_phase_2_starts_from_the_export_phase_1_writes():
    """sd2-base-512 reads model.init_from where sd2-base-256 exports: <storage_path>/<run_name>/export/unet."""
    from pipelines.core import storage
    from pipelines.inference.export import UNET_DIR
    from pipelines.train.driver import run_dir
    from pipelines.train.worker import EXPORT_DIR

    phase_1 = load_config(TrainConfig, CONFIGS / "sd2-base-256.yaml")
    phase_2 = load_config(TrainConfig, CONFIGS / "sd2-base-512.yaml")
    assert storage.is_uri(phase_1.storage_path) and phase_2.storage_path == phase_1.storage_path
    assert phase_2.model.init_from == storage.join(run_dir(phase_1), EXPORT_DIR, UNET_DIR)
    assert phase_2.model.init_from == "s3://YOUR-BUCKET/runs/sd2-base-256/export/unet"
