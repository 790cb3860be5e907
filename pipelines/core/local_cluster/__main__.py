"""`python -m pipelines.core.local_cluster up|status|down` (see cli.py)."""

import sys

from pipelines.core.local_cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
