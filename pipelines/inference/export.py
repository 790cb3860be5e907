"""The exported model directory: everything needed to draw images, and nothing from the training run.

    <model_dir>/
      latentforge_model.json     format version, weights kind (ema | live), step, latent shape,
                                 VAE scaling/shift factors, schedule config, encoder sources, train config,
                                 the recommended sampling settings (recommended_sampler)
      unet/config.json           UNet.save_pretrained
      unet/model.safetensors
      empty_caption.safetensors  the empty caption's features (the unconditional branch of CFG)
      vae/                       a copy of the VAE directory when the features used a local one

Written into a temporary sibling and renamed (on local disks) or uploaded file by file with
latentforge_model.json LAST (object stores): a directory without it is not a model. The manifest has a name of
its own: `model_index.json` is diffusers' pipeline index, which pipelines/inference/diffusers_export.py writes
into the diffusers-format copy of this directory.
`load_exported` refuses such a directory with a message that says so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import UNetConfig
from model.encoders import diffusers_component
from model.samplers import SamplerConfig
from model.schedule import NoiseSchedule, ScheduleConfig
from model.unet import CONFIG_FILE as UNET_CONFIG_FILE
from model.unet import WEIGHTS_FILE as UNET_WEIGHTS_FILE
from model.unet import UNet
from pipelines.core import storage
from pipelines.core.config import from_dict
from pipelines.data.schema import Manifest
from pipelines.inference.draw import EncoderSources

INDEX_FILE = "latentforge_model.json"
LEGACY_INDEX_FILE = "model_index.json"  # this manifest's name in exports written before it had its own
UNET_DIR = "unet"
VAE_DIR = "vae"
EMPTY_CAPTION_FILE = "empty_caption.safetensors"
FORMAT = "latentforge-t2i"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportInfo:
    weights: str  # "ema" or "live"
    step: int
    schedule: ScheduleConfig
    encoders: EncoderSources
    latent_shape: tuple[int, int, int]
    image_size: int
    scaling_factor: float
    shift_factor: float
    train_config: dict[str, Any]
    sampling: SamplerConfig  # what every consumer samples with unless told otherwise (recommended_sampler)
    run_name: str | None = None  # the training run, for evaluation runs to attach to
    mlflow_run_id: str | None = None


def write_export(out_dir: str, unet_cfg: UNetConfig, weights: dict[str, torch.Tensor], info: ExportInfo,
                 features_dir: str, manifest: Manifest) -> None:
    """Write the model directory at out_dir (local path or URI), replacing an older export atomically."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local = Path(tmp) / "model"
        unet = UNet(unet_cfg)
        unet.load_state_dict(weights)
        unet.save_pretrained(local / UNET_DIR)
        storage.write_bytes(str(local / EMPTY_CAPTION_FILE),
                            storage.read_bytes(storage.join(features_dir, manifest.empty_caption_file)))
        encoders = info.encoders
        if encoders.vae_source != "tiny":  # the VAE's own folder, also when the source is a whole pipeline
            shutil.copytree(diffusers_component(encoders.vae_source, VAE_DIR), local / VAE_DIR)
            encoders = dataclasses.replace(encoders, vae_source=VAE_DIR)  # relative to the model dir
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": info.weights, "step": info.step,
                 "schedule": dataclasses.asdict(info.schedule), "encoders": encoders.to_dict(),
                 "latent_shape": list(info.latent_shape), "image_size": info.image_size,
                 "scaling_factor": info.scaling_factor, "shift_factor": info.shift_factor,
                 "train_config": info.train_config, "sampling": dataclasses.asdict(info.sampling),
                 "run_name": info.run_name,
                 "mlflow_run_id": info.mlflow_run_id}
        # credentials inside URIs (the train config's, the encoder sources') stay out of the model
        (local / INDEX_FILE).write_text(json.dumps(storage.redact_values(index), indent=1))
        publish(local, out_dir)


def publish(local: Path, out_dir: str, last: str = INDEX_FILE) -> None:
    """Put the finished folder `local` at out_dir: renamed into place on a local disk; on an object store uploaded
    file by file with `last` (the file that makes it a model) removed first and written last."""
    if not storage.is_uri(out_dir):
        target = Path(out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(local, staging)
        old = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    for name in sorted({last, LEGACY_INDEX_FILE}):  # the old export stops being a model first
        storage.remove(storage.join(out_dir, name))
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.relative_to(local).as_posix() != last)
    for path in [*files, local / last]:
        storage.write_bytes(storage.join(out_dir, path.relative_to(local).as_posix()), path.read_bytes())


def recommended_sampler(index: dict[str, Any]) -> SamplerConfig:
    """The sampling settings a model is meant to be drawn with: its manifest's `sampling` (the training config's
    samples.sampler, which also drew the training previews); for exports written before the manifest carried
    them, the same setting read from the recorded train config; else SamplerConfig's defaults. sample_eval, the
    MLflow model and the diffusers export all start from these, and a user's explicit setting overrides them."""
    recorded = index.get("sampling")
    if recorded is None:
        recorded = ((index.get("train_config") or {}).get("samples") or {}).get("sampler")
    if recorded is None:
        return SamplerConfig()
    if not isinstance(recorded, dict):
        raise ValueError(f"{INDEX_FILE}: sampling must be a mapping of sampler settings, got {recorded!r}")
    return from_dict(SamplerConfig, recorded, prefix="sampling.")


@dataclass
class ExportedModel:
    """A loaded model directory: the U-Net, the schedule, the empty caption, and how to build the encoders."""

    directory: str
    unet: UNet
    schedule: NoiseSchedule
    encoders: EncoderSources
    empty_caption: tuple[torch.Tensor, torch.Tensor]  # (L, D) float32, (L,) bool
    index: dict[str, Any]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])

    @property
    def scaling_factor(self) -> float:
        return float(self.index["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.index["shift_factor"])

    @property
    def sampler(self) -> SamplerConfig:
        return recommended_sampler(self.index)


def load_index(model_dir: str | Path) -> dict[str, Any]:
    """The manifest (INDEX_FILE) of an exported model, after checking the directory is complete. model_dir is a
    local path or a URI (s3://...: an evaluation checks a model on object storage before any worker fetches it)."""
    root = storage.absolute(model_dir).rstrip("/")
    index_path = storage.join(root, INDEX_FILE)
    if not storage.is_dir(root):
        raise FileNotFoundError(f"model directory {root} not found")
    if not storage.is_file(index_path):
        legacy = storage.join(root, LEGACY_INDEX_FILE)
        index = storage.read_json(legacy) if storage.is_file(legacy) else {}
        if index.get("format") == FORMAT:  # written before the manifest had a name of its own
            index_path = legacy
        elif index.get("_class_name"):
            raise FileNotFoundError(f"{root} is a diffusers {index['_class_name']} folder, not an export of this "
                                    "project: load it with diffusers, or give the export it was made from")
        else:
            raise FileNotFoundError(f"{root} is not an exported model: {INDEX_FILE} is missing (it is written "
                                    "last, so the export is missing or was interrupted; rerun jobs/train_unet.py "
                                    "to export)")
    index = storage.read_json(index_path)
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{index_path}: format {index.get('format')!r} v{index.get('format_version')} is not "
                         f"{FORMAT!r} v{FORMAT_VERSION}")
    for name in (f"{UNET_DIR}/{UNET_CONFIG_FILE}", f"{UNET_DIR}/{UNET_WEIGHTS_FILE}", EMPTY_CAPTION_FILE):
        if not storage.is_file(storage.join(root, name)):
            raise FileNotFoundError(f"{root} is incomplete: {name} is missing (re-export the model)")
    for name in (f"{UNET_DIR}/{UNET_WEIGHTS_FILE}", EMPTY_CAPTION_FILE):
        check_safetensors_complete(storage.join(root, name))
    return index


def check_safetensors_complete(location: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then the
    data: a file whose size is not what its header says was cut short (an interrupted copy or upload) or
    damaged. Reads only the header, so a model on object storage is checked without fetching it."""
    fs, path = storage.resolve(location)
    size = fs.get_file_info(path).size
    with storage.open_input(location) as stream:
        head = stream.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        try:
            header = json.loads(stream.read(length)) if length is not None and 8 + length <= size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{location} is truncated or not a safetensors file ({size} bytes; re-export the model)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + length + end:
        state = "truncated" if size < 8 + length + end else "damaged"
        raise ValueError(f"{location} is {state}: {size} bytes, its header describes {8 + length + end} "
                         "(re-export the model)")


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Load a directory written by write_export; a missing or half-written one is a clear error."""
    root = Path(model_dir)
    index = load_index(root)  # also refuses truncated weight files
    try:
        unet = UNet.from_pretrained(root / UNET_DIR, device=device).eval()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type on a damaged file
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{root / UNET_DIR / UNET_WEIGHTS_FILE} is damaged: {err} (re-export the model)") from None
    encoders = EncoderSources.from_dict(index["encoders"])
    if encoders.vae_source == VAE_DIR:
        encoders = dataclasses.replace(encoders, vae_source=str(root / VAE_DIR))
    empty = _empty_caption(root)
    schedule = NoiseSchedule(ScheduleConfig(**index["schedule"]))
    return ExportedModel(str(root), unet, schedule, encoders, empty, index)


def _empty_caption(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    from pipelines.data.schema import EMPTY_CAPTION_MASK, EMPTY_CAPTION_STATES

    tensors = load_file(root / EMPTY_CAPTION_FILE)
    return tensors[EMPTY_CAPTION_STATES].float(), tensors[EMPTY_CAPTION_MASK].bool()
