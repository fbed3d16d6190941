"""`python -m moe.train +experiment=NAME`: expert-parallel MoE training on Ray.

A thin Hydra entry point: compose the config, hand it to the driver in
`cluster.launch`. Ray, Hydra and the data pipeline are imported here, not by
`import moe`, which stays torch-only.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cluster.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from cluster.launch import TrainingStopped, train

    try:
        train(cfg)
    except (ValueError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
