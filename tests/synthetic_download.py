"""One download of the synthetic web for the whole test session (conftest.py's `synthetic_download` fixture).

img2dataset over the loopback server, on the session's local Ray, with configs/tiny/download.yaml: the same run
that test_data_chain.py starts its chain from and test_download.py checks shard by shard, so it runs once. The
dataset is every training combination once (test_data_chain's premise) with every planted kind, some twice.

The folder is read-only for the tests: one that changes a download (breaks a shard, fails one, runs the job,
which writes its report) works on a copy (`copy_download`), so a test cannot change what another one reads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.core.config import load_config
from pipelines.core.job import run_stage
from pipelines.data.download import REPORT_FILE, STAGE, DownloadConfig
from pipelines.synthetic.shapes import (
    PLANTED_KINDS,
    PlantedCounts,
    SyntheticConfig,
    SyntheticDataset,
    build_dataset,
    training_attributes,
)
from pipelines.synthetic.web import SyntheticServer, write_url_list

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "download.yaml"
N_GOOD = len(training_attributes())  # every training combination once: 150
PLANTED = PlantedCounts(**{**{kind: 1 for kind in PLANTED_KINDS}, "http_404": 2, "truncated_jpeg": 2,
                           "duplicate_image": 2})
# How each planted kind the download drops must end up (configs/tiny: min_image_size=16, any aspect ratio).
DOWNLOAD_REASON = {"http_404": "http_404", "http_500": "http_500", "html_page": "decode_error",
                   "truncated_jpeg": "decode_error", "truncated_png": "decode_error", "tiny_image": "too_small"}


def file_mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir()) if p.is_file()}


@dataclass(frozen=True)
class SyntheticDownload:
    dataset: SyntheticDataset
    cfg: DownloadConfig  # its url_list points at the server, stopped once the download finished
    report: dict  # the download's report as written
    rerun: dict  # the report of the rerun with the server down
    mtimes: dict[str, int]  # the folder's files after the download ...
    mtimes_rerun: dict[str, int]  # ... and after the rerun
    seconds: dict[str, float]

    @property
    def raw(self) -> Path:
        return Path(self.cfg.output_dir)


def download_once(root: Path) -> SyntheticDownload:
    """Download the synthetic web into root/raw, then rerun it with the server down (a rerun that fetched
    anything would fail). Both must exit 0."""
    dataset = build_dataset(SyntheticConfig(num_good=N_GOOD, seed=3, planted=PLANTED))
    raw, seconds = root / "raw", {}
    with SyntheticServer(dataset.responses) as server:
        url_list = write_url_list(dataset, server.base_url, root / "urls.parquet")
        cfg = load_config(DownloadConfig, CONFIG,
                          [f"url_list={url_list}", f"output_dir={raw}", "allow_private_addresses=true"])
        start = time.perf_counter()
        assert run_stage(STAGE, cfg) == 0
        seconds["download"] = round(time.perf_counter() - start, 1)
    report, mtimes = json.loads((raw / REPORT_FILE).read_text()), file_mtimes(raw)
    start = time.perf_counter()
    assert run_stage(STAGE, cfg) == 0
    seconds["download_rerun"] = round(time.perf_counter() - start, 1)
    return SyntheticDownload(dataset, cfg, report, json.loads((raw / REPORT_FILE).read_text()), mtimes,
                             file_mtimes(raw), seconds)


def copy_download(download: SyntheticDownload, into: Path, **changes) -> DownloadConfig:
    """A copy of the download's folder at into/raw (files with their mtimes); its config, with `changes`."""
    shutil.copytree(download.raw, into / "raw")
    return replace(download.cfg, output_dir=str(into / "raw"), **changes)
