"""`python -m moe.evaluate checkpoint=PATH [data.output=DIR] [batches=N] [batch_size=N] [seq_len=N] [device=D]`:
validation loss and perplexity of a checkpoint.

A thin entry point: the evaluation reads the data pipeline's validation split,
so it lives in `cluster/evaluate.py` and is imported inside `main`; `import moe`
stays torch-only.
"""

from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    from cluster.evaluate import main as evaluate_main

    evaluate_main(argv)


if __name__ == "__main__":
    main()
