"""Filter raw image-caption WebDataset shards into clean ones (jobs/filter_data.py).

Input: a download-stage folder of `NNNNN.tar` (per sample `KEY.jpg`, `KEY.txt`, `KEY.json`) with
`NNNNN_stats.json` beside each finished shard; a tar without its stats file is unfinished, skipped
and counted. Output: `NNNNN.tar` under the SAME name as its input shard, holding the kept samples'
original bytes unchanged, plus `filter_report.json`.

Three passes, so that deduplication is global across shards and names are deterministic (config.py
holds the settings, rows.py the per-row checks, driver.py the stage):

1. scan (scan.py, Ray Data, one task per input shard): per-row checks (caption, decode, size, aspect) and
   dedup signatures (sha256 of the decoded pixels, a 64-bit dHash, an 8x8 colour thumbnail).
   Optional CLIP scoring runs in an actor pool on the rows still alive. Only small per-row records
   come back to the driver, never pixels; it logs a progress line (pipelines/core/progress.py) as each
   shard's last record arrives.
2. decide (dedup.py, on the driver): one pass in a fixed order (key, shard, position) drops
   duplicate keys, exact and near duplicates, keeping the first of each group; the result does not
   depend on how Ray scheduled the scan. Records are ~300 bytes a row, so ~10M rows need ~3 GB on the driver;
   beyond that, exact dedup would move to a Ray Data groupby on sha256.
3. write (write.py, Ray Data, one task per input shard): kept samples go to
   `<output>/.staging-<id>/NAME.tar` (committed atomically: pipelines/core/storage.py), a progress line per
   shard written. The driver then commits: it removes the old report,
   moves staged shards into place, deletes other `.tar` files there, and the caller writes the new
   report last. All writes go to the output folder through pyarrow filesystems, so on a cluster it
   must be shared storage (a path mounted on every node, or an s3://-style URI).

Rerun rule: the report is the commit marker (the output is valid only while it says ok). A rerun
whose input shards (name, size, mtime) and filter settings match the committed report is a no-op;
any other rerun, or `force=true`, is a clean overwrite: nothing of the old output survives next to
the new one. A failed run (e.g. no rows left) commits no shards, but its report replaces the old
one, so the folder reads as unfinished until a run succeeds. One filter run per output folder at a
time (a run removes staging folders of crashed runs).
"""
