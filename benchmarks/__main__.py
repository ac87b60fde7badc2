"""``python -m benchmarks``: every benchmark, one JSON (see ``run_all``)."""

import sys

from benchmarks import run_all

if __name__ == "__main__":
  sys.exit(run_all.main())
