"""Prompt files for evaluation: a .txt file (one prompt a line) or .parquet / .jsonl with `prompt` and an
optional `seed` column.

    rows = read_prompts("prompts.txt", base_seed=0)     # [PromptRow(prompt, seed), ...]

Blank lines of a text file are skipped (they are layout, not prompts); an empty prompt in a table, a
missing `prompt` column, a non-integer seed, or a file with no prompt at all is an error naming the file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from pipelines.core import storage


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int


def read_prompts(location: str, base_seed: int = 0) -> list[PromptRow]:
    """Rows without a seed get base_seed + their row number, so every image has a known seed."""
    if not storage.is_file(location):
        raise FileNotFoundError(f"prompt file {location} not found")
    suffix = location.rsplit(".", 1)[-1].lower() if "." in location else ""
    if suffix == "parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(io.BytesIO(storage.read_bytes(location))).to_pylist()
    elif suffix in ("jsonl", "json"):
        records = [_json_line(location, n, line) for n, line in enumerate(storage.read_text(location).splitlines(), 1)
                   if line.strip()]
    else:
        records = [{"prompt": line.strip()} for line in storage.read_text(location).splitlines() if line.strip()]
    rows = [_row(location, n, record, base_seed) for n, record in enumerate(records)]
    if not rows:
        raise ValueError(f"prompt file {location} holds no prompt")
    return rows


def _json_line(location: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{location}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{location}:{number}: expected an object with a `prompt` key")
    return record


def _row(location: str, n: int, record: dict, base_seed: int) -> PromptRow:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{location}: row {n} has no prompt (a non-empty `prompt` column/key is required)")
    seed = record.get("seed")
    if seed is None:
        seed = base_seed + n
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{location}: row {n} has seed {seed!r}; seeds must be integers >= 0")
    return PromptRow(prompt.strip(), int(seed))
