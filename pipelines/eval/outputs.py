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
from pipelines.inference.draw import captioned_grid, save_png
from pipelines.synthetic import checker

IMAGES_DIR, GRIDS_DIR, RESULTS_FILE = "images", "grids", "results.jsonl"
TABLE_FILE = "eval_table.json"  # the MLflow table of results_table
# Above this many images the table names the image files only: MLflow stores each table image twice, one by one.
TABLE_IMAGES_MAX = 200
_TABLE_TILE = 128  # table images are upscaled (nearest neighbour) to at least this many pixels a side


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
                                 "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps,
                                 "guidance_rescale": cfg.sampling.guidance_rescale, "image": name,
                                 "scores": scores}))
    storage.write_text(storage.join(cfg.out, RESULTS_FILE), "\n".join(lines) + "\n")
    grids = write_grids(cfg, rows, images)
    # a rerun into the same OUT_DIR: what an earlier run with more prompts or other guidance scales left goes
    remove_others(cfg.out, IMAGES_DIR, [json.loads(line)["image"] for line in lines])
    remove_others(cfg.out, GRIDS_DIR, grids.values())
    return {
        "model": cfg.model, "model_step": index.get("step"), "model_weights": index.get("weights"),
        "prompts_file": cfg.prompts, "images": len(rows), "prompts": len({r["prompt"] for r in rows}),
        "sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps, "guidance_rescale": cfg.sampling.guidance_rescale,
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
    """One grid per guidance scale (the first grid_images of it, each prompt and seed under its image); returns
    {guidance key: relative path}."""
    out = {}
    for g in cfg.sampling.guidance_scales:
        picked = [(r, im) for r, im in zip(rows, images) if r["guidance"] == float(g)][: cfg.grid_images]
        if not picked:
            continue
        columns = int(np.ceil(np.sqrt(len(picked))))
        name = f"{GRIDS_DIR}/{guidance_key(g)}.png"
        captions = [f"{r['prompt']} (seed {r['seed']})" for r, _ in picked]
        grid = captioned_grid(np.stack([im for _, im in picked]), captions, columns=columns)
        save_png(grid, storage.join(cfg.out, name))
        out[guidance_key(g)] = name
    return out


def _clip(cfg: Any, rows: list[dict[str, Any]], images: list[np.ndarray]) -> dict[str, Any]:
    m = cfg.metrics
    return metrics.clip_score(images, [r["prompt"] for r in rows], m.clip_model, m.clip_weights).as_dict()


def _fid(cfg: Any, images: list[np.ndarray]) -> dict[str, Any]:
    m = cfg.metrics
    real = read_image_folder(m.fid_reference) if m.fid_reference else None
    return metrics.fid(real, images, weights_path=m.fid_weights).as_dict()


def results_table(out: str) -> Any:
    """results.jsonl of OUT_DIR as a pandas DataFrame, a row per image: prompt, seed, guidance, image_file (in
    OUT_DIR), read (what the checker read from the image), wrong (the attributes it got wrong) and result: pass,
    fail, or "not checked" (a prompt outside the synthetic vocabulary); plus the image itself (column image,
    upscaled) when there are at most TABLE_IMAGES_MAX."""
    import pandas as pd
    from PIL import Image

    records = [json.loads(line) for line in storage.read_text(storage.join(out, RESULTS_FILE)).splitlines() if line]
    table = pd.DataFrame({
        "prompt": [r["prompt"] for r in records], "seed": [r["seed"] for r in records],
        "guidance": [r["guidance"] for r in records], "image_file": [r["image"] for r in records],
        "read": [_read_text(r["scores"]) for r in records],
        "wrong": [", ".join(k for k in checker.ATTRIBUTE_NAMES if r["scores"][k] is False) for r in records],
        "result": [{True: "pass", False: "fail", None: "not checked"}[r["scores"]["all_correct"]] for r in records]})
    if len(records) <= TABLE_IMAGES_MAX:
        images = [Image.open(io.BytesIO(storage.read_bytes(storage.join(out, r["image"])))).convert("RGB")
                  for r in records]
        table.insert(4, "image", [_upscaled(image) for image in images])
    return table


def _upscaled(image: Any) -> Any:
    from PIL import Image

    scale = max(1, -(-_TABLE_TILE // min(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _read_text(scores: dict[str, Any]) -> str:
    """What the checker read, in words: "large red circle, top left"; "nothing" when it found no shape."""
    if not scores["in_vocabulary"]:
        return "not checked: the prompt is outside the synthetic vocabulary"
    read = scores["read"]
    if read is None:
        return "nothing (no shape found)"
    words = " ".join(str(read.get(k) or "?") for k in ("size", "color", "shape"))
    return f"{words}, {str(read.get('position')).replace('_', ' ')}"


def read_image_folder(folder: str) -> list[np.ndarray]:
    """Every .png/.jpg/.jpeg in folder (sorted, not recursive) as (H, W, 3) uint8: FID's real images."""
    from pathlib import Path

    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise ValueError(f"metrics.fid_reference: {folder} holds no .png/.jpg image")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
