"""Real photographs keep their framing through the data chain: download -> filter -> precompute -> loader.

scikit-image's bundled photos (tests/photos.py: sizes from 172x448 to 1000x872, colour and gray) and the
encodings the web serves (EXIF-rotated JPEG, CMYK JPEG, 16-bit PNG, palette PNG, RGBA PNG, animated GIF, a 5:1
panorama), served over a loopback HTTP server to the real downloader (img2dataset, keep_ratio), filtered
and precomputed with the tiny presets at 64 px in three buckets (80x48, 64x64, 48x80).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.config import load_config
from pipelines.core.images import decode_rgb
from pipelines.core.job import run_stage
from pipelines.data import schema
from pipelines.data.buckets import nearest_bucket
from pipelines.data.download import STAGE as DOWNLOAD
from pipelines.data.download import DownloadConfig
from pipelines.data.filter.config import REPORT_FILE as FILTER_REPORT
from pipelines.data.filter.config import FilterConfig
from pipelines.data.filter.driver import STAGE as FILTER
from pipelines.data.loader import BATCH_KEYS, BATCH_LATENT_MEAN, FeatureLoader, LoaderConfig
from pipelines.data.precompute.config import REPORT_FILE as PRECOMPUTE_REPORT
from pipelines.data.precompute.config import PrecomputeConfig
from pipelines.data.precompute.driver import STAGE as PRECOMPUTE
from pipelines.synthetic.shapes import Response
from pipelines.synthetic.web import SyntheticServer
from tests.photos import photo_files

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
SIZE = 64
BUCKETS = ((80, 48), (64, 64), (48, 80))
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif"}


def _samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """The photo's name (from its .json) -> its files, over every tar of a stage's folder."""
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted(directory.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for files in members.values():
            found[json.loads(files["json"])["name"]] = files
    return found


@pytest.fixture(scope="module")
def chain(ray_local, tmp_path_factory):
    photos = photo_files()
    root = tmp_path_factory.mktemp("photo-chain")
    raw, filtered, features = root / "raw", root / "filtered", root / "features"
    formats = {name: Image.open(io.BytesIO(data)).format for name, (data, _) in photos.items()}
    responses = {f"/{name}": Response(200, CONTENT_TYPES[formats[name]], data) for name, (data, _) in photos.items()}
    with SyntheticServer(responses) as server:
        pq.write_table(pa.table({"url": [server.url_for(f"/{n}") for n in photos],
                                 "caption": [caption for _, caption in photos.values()], "name": list(photos)}),
                       root / "urls.parquet")
        download = load_config(DownloadConfig, CONFIGS / "download.yaml",
                               [f"url_list={root / 'urls.parquet'}", f"output_dir={raw}", f"image_size={SIZE}",
                                "allow_private_addresses=true", "number_sample_per_shard=8"])
        assert run_stage(DOWNLOAD, download) == 0
    assert run_stage(FILTER, load_config(FilterConfig, CONFIGS / "filter.yaml",
                                         [f"input_dir={raw}", f"output_dir={filtered}"])) == 0
    assert run_stage(PRECOMPUTE, load_config(PrecomputeConfig, CONFIGS / "precompute.yaml",
                                             [f"input_dir={filtered}", f"output_dir={features}", f"image_size={SIZE}",
                                              "compute.batch_size=8"])) == 0
    upright = {name: decode_rgb(data).size for name, (data, _) in photos.items()}  # (width, height), EXIF applied
    return {"photos": photos, "upright": upright, "raw": _samples(raw), "filtered": filtered, "features": features}


def test_download_keeps_each_photos_aspect_in_every_mode(chain):
    assert set(chain["raw"]) == set(chain["photos"])  # every mode decoded: none dropped
    for name, files in chain["raw"].items():
        width, height = Image.open(io.BytesIO(files["jpg"])).size
        original_w, original_h = chain["upright"][name]
        assert min(width, height) == SIZE, name  # the short side at image_size
        assert abs(width / height - original_w / original_h) < 0.05 * original_w / original_h, name  # the aspect kept
    stored = Image.open(io.BytesIO(chain["raw"]["coffee_exif_rotated"]["jpg"]))
    assert stored.height > stored.width  # stored 600x400 with EXIF "turn 90": upright it is portrait


def test_the_filter_drops_the_panorama_and_keeps_the_rest(chain):
    report = json.loads((chain["filtered"] / FILTER_REPORT).read_text())
    dropped = {reason: count for reason, count in report["dropped"].items() if count}
    assert report["ok"] and dropped == {"aspect_ratio": 1}  # hubble_panorama, 5:1 > max_aspect 3
    assert set(_samples(chain["filtered"])) == set(chain["photos"]) - {"hubble_panorama"}


def test_precompute_puts_each_photo_in_the_bucket_nearest_its_aspect(chain):
    features = chain["features"]
    manifest = schema.Manifest.load(features)
    assert manifest.buckets == BUCKETS and not manifest.flip
    names = {json.loads(f["json"])["key"]: n for n, f in _samples(chain["filtered"]).items()}
    found = {}
    for shard in manifest.shards:
        table = pq.read_table(features / shard["name"])
        for key, h, w in zip(*(table.column(c).to_pylist() for c in (schema.KEY, schema.BUCKET_HEIGHT,
                                                                      schema.BUCKET_WIDTH))):
            found[names[key]] = (h, w)
    expected = {name: nearest_bucket(BUCKETS, *chain["upright"][name]) for name in names.values()}
    assert found == expected
    assert {"coffee_exif_rotated": (80, 48), "coffee": (48, 80), "astronaut": (64, 64)}.items() <= found.items()
    report = json.loads((features / PRECOMPUTE_REPORT).read_text())
    assert report["bucket_rows"] == {f"{h}x{w}": sum(b == (h, w) for b in found.values()) for h, w in BUCKETS}


def test_the_loader_batches_one_bucket_at_a_time(chain):
    loader = FeatureLoader(chain["features"], LoaderConfig(batch_size=1, with_text=True, window_shards=0))
    shapes = {tuple(batch[BATCH_LATENT_MEAN].shape[2:]) for batch in loader}
    assert shapes == {(20, 12), (16, 16), (12, 20)}  # the tiny VAE's latents (factor 4) of the three buckets
    two = [FeatureLoader(chain["features"], LoaderConfig(batch_size=2, with_text=True), rank=r, world_size=2)
           for r in range(2)]
    for step in zip(*two):
        assert step[0][BATCH_LATENT_MEAN].shape == step[1][BATCH_LATENT_MEAN].shape
        assert not set(step[0][BATCH_KEYS]) & set(step[1][BATCH_KEYS])
