"""Serve the synthetic captioned-shapes dataset over loopback HTTP, like the web, until stopped.

Builds the dataset (pipelines/synthetic/shapes.py), writes it to --out (files/, routes.json, items.parquet),
serves it on 127.0.0.1 at a free port (or --port), and writes --out/url_list.parquet pointing at
the server: feed that to jobs/download_data.py with --set allow_private_addresses=true (127.0.0.1 is
refused by default). Stops on Ctrl-C or SIGTERM. Exit status: 0 stopped by a signal, 1 the dataset or the
URL list could not be written (one line names the file), 2 bad config.

examples:
  python jobs/serve_synthetic.py --out /tmp/synth --set num_good=2000
  python jobs/serve_synthetic.py --out /tmp/synth --set planted.http_404=5 --set planted.html_page=3
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from pipelines.core.config import parse_job_args
from pipelines.core.runtime import setup_logging
from pipelines.synthetic.shapes import SyntheticConfig, build_dataset
from pipelines.synthetic.web import SyntheticServer, write_dataset, write_url_list

log = logging.getLogger("latentforge.synthetic")
URL_LIST_FILE = "url_list.parquet"


def _arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="directory for the dataset and url_list.parquet")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_job_args(SyntheticConfig, __doc__, argv, extra=_arguments)
    setup_logging()
    try:
        dataset = build_dataset(cfg)
    except ValueError as err:
        log.error("synthetic dataset: %s", err)
        return 2
    try:
        received = _serve(dataset, Path(args.out))
    except OSError as err:  # the dataset or the URL list could not be written: exit 1, one line, server stopped
        log.error("serve_synthetic failed: %s: %s", type(err).__name__, err)
        return 1
    log.info("stopped by %s", signal.Signals(received).name)
    return 0


def _serve(dataset, out: Path) -> int:
    """Write the dataset, serve it until a stop signal; returns the signal."""
    out = write_dataset(dataset, out)
    # Block the stop signals before the server thread starts, so only sigwait below receives them.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with SyntheticServer(dataset.responses) as server:
        url_list = write_url_list(dataset, server.base_url, out / URL_LIST_FILE)
        log.info("serving %d items at %s; url list: %s (Ctrl-C to stop)", len(dataset.rows), server.base_url,
                 url_list)
        return signal.sigwait(stop_signals)


if __name__ == "__main__":
    sys.exit(main())
