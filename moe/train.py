"""`python -m moe.train +experiment=NAME`: expert-parallel MoE training on Ray.

A thin Hydra entry point: compose the config, hand it to the driver in
`cluster.launch`. The configs' schemas and the driver are imported inside
`main`, never by `import moe`, which stays torch-only.
"""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _train(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from cluster.config import validate_train_config

    try:  # the config's own errors in a second, before torch, Ray and the driver load
        validate_train_config(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    from cluster.launch import TrainingStopped, interrupted_message, train

    terminated = []

    def on_sigterm(signum: int, frame: object) -> None:  # a scheduler or `kill`: stop as Ctrl-C does
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C must arrive as KeyboardInterrupt even when the launching shell ignored SIGINT for us (a script's
    # background job inherits SIG_IGN, and Python then leaves it ignored): a run is always interruptible.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        train(cfg)
    except (ValueError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n[moe.train] {interrupted_message(cfg, list(HydraConfig.get().overrides.task))}", file=sys.stderr,
              flush=True)
        sys.exit(143 if terminated else 130)  # the shell's codes for SIGTERM and SIGINT


def main() -> None:
    from cluster.config import register_configs

    register_configs()  # the structured schemas, before Hydra composes
    _train()


if __name__ == "__main__":
    main()
