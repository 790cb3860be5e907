"""What an evaluation writes: images, per-image scores (results.jsonl), grids per guidance scale, metrics.

    metrics = write_outputs(cfg, rows, pngs, model_index)

Synthetic-caption accuracy is reported per guidance scale (each is its own condition) and split into
seen and held-out (colour, shape) combinations; prompts outside the synthetic vocabulary are counted
and left out of it. CLIP score and FID are computed only from weights the user gave, else reported as
not computed with the reason.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipelines.core import storage
from pipelines.eval import metrics
from pipelines.inference.draw import image_grid, save_png
from pipelines.synthetic import checker

IMAGES_DIR, GRIDS_DIR, RESULTS_FILE = "images", "grids", "results.jsonl"


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8


def guidance_key(guidance: float) -> str:
    return f"guidance_{guidance:g}"


def write_outputs(cfg: Any, rows: list[dict[str, Any]], pngs: dict[int, bytes], index: dict[str, Any]) -> dict[str, Any]:
    missing = [r["index"] for r in rows if r["index"] not in pngs]
    if missing:
        raise RuntimeError(f"{len(missing)} images were not produced (first indices {missing[:5]})")
    images, records, lines = [], [], []
    for row in rows:
        png = pngs[row["index"]]
        name = f"{IMAGES_DIR}/{row['index']:05d}.png"
        storage.write_bytes(storage.join(cfg.out, name), png)
        image = _decode(png)
        scores = checker.score_image(image, row["prompt"])
        images.append(image)
        records.append({**row, "scores": scores})
        lines.append(json.dumps({"prompt": row["prompt"], "seed": row["seed"], "guidance": row["guidance"],
                                 "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps, "image": name,
                                 "scores": scores}))
    storage.write_text(storage.join(cfg.out, RESULTS_FILE), "\n".join(lines) + "\n")
    grids = write_grids(cfg, rows, images)
    # a rerun into the same OUT_DIR: what an earlier run with more prompts or other guidance scales left goes
    remove_others(cfg.out, IMAGES_DIR, [json.loads(line)["image"] for line in lines])
    remove_others(cfg.out, GRIDS_DIR, grids.values())
    return {
        "model": cfg.model, "model_step": index.get("step"), "model_weights": index.get("weights"),
        "prompts_file": cfg.prompts, "images": len(rows), "prompts": len({r["prompt"] for r in rows}),
        "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps,
        "guidance_scales": list(cfg.sampling.guidance_scales), "grids": grids,
        "synthetic_accuracy": {guidance_key(g): checker.synthetic_accuracy(
            [r["scores"] for r in records if r["guidance"] == float(g)]) for g in cfg.sampling.guidance_scales},
        "clip_score": _clip(cfg, rows, images),
        "fid": _fid(cfg, images),
    }


def remove_others(out: str, folder: str, written: Iterable[str]) -> None:
    """Delete the files of out/folder that this run did not write (`written`: paths relative to out): OUT_DIR then
    holds this run's outputs only, as results.jsonl and metrics.json list them (MLflow logs the grids folder)."""
    keep = set(written)
    for name in storage.list_files(storage.join(out, folder), hidden=True):
        if f"{folder}/{name}" not in keep:
            storage.remove(storage.join(out, folder, name))


def write_grids(cfg: Any, rows: list[dict[str, Any]], images: list[np.ndarray]) -> dict[str, str]:
    """One grid per guidance scale (the first grid_images of it); returns {guidance key: relative path}."""
    out = {}
    for g in cfg.sampling.guidance_scales:
        picked = [im for r, im in zip(rows, images) if r["guidance"] == float(g)][: cfg.grid_images]
        if not picked:
            continue
        columns = int(np.ceil(np.sqrt(len(picked))))
        name = f"{GRIDS_DIR}/{guidance_key(g)}.png"
        save_png(image_grid(np.stack(picked), columns=columns), storage.join(cfg.out, name))
        out[guidance_key(g)] = name
    return out


def _clip(cfg: Any, rows: list[dict[str, Any]], images: list[np.ndarray]) -> dict[str, Any]:
    m = cfg.metrics
    return metrics.clip_score(images, [r["prompt"] for r in rows], m.clip_model, m.clip_weights).as_dict()


def _fid(cfg: Any, images: list[np.ndarray]) -> dict[str, Any]:
    m = cfg.metrics
    real = read_image_folder(m.fid_reference) if m.fid_reference else None
    return metrics.fid(real, images, weights_path=m.fid_weights).as_dict()


def read_image_folder(folder: str) -> list[np.ndarray]:
    """Every .png/.jpg/.jpeg in folder (sorted, not recursive) as (H, W, 3) uint8: FID's real images."""
    from pathlib import Path

    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise ValueError(f"metrics.fid_reference: {folder} holds no .png/.jpg image")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
