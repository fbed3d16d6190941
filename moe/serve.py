"""`python -m moe.serve small=CKPT large=CKPT [port=8000]`: the cascade on Ray Serve.

A thin Hydra entry point: compose conf/serve.yaml and hand it to the Serve
application in `serving.app`. Ray, Serve and FastAPI are imported here, not by
`import moe`, which stays torch-only.
"""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def _serve(cfg: DictConfig) -> None:
    from serving.app import serve_forever

    # Ctrl-C stops the service even when the launching shell ignored SIGINT for us (a script's background job
    # inherits SIG_IGN, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve_forever(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Registers the serve config's schema (typos fail at composition), then runs the Hydra command."""
    from serving.config import register_configs

    register_configs()
    _serve()


if __name__ == "__main__":
    main()
