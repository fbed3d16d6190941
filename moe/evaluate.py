"""The checkpoint evaluation's command moved to `python -m cluster.evaluate checkpoint=PATH ...`: it reads the
data pipeline's validation split, which lives above `moe/` (moe/ imports nothing above itself)."""

from __future__ import annotations

import sys


def main() -> None:
    print("error: the evaluation's command is `python -m cluster.evaluate checkpoint=PATH [data.output=DIR] "
          "[batches=N] [batch_size=N] [seq_len=N] [device=D]`", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
