"""`python -m cluster.plan +experiment=NAME [overrides]`: the memory plan of a training config.

`moe/plan.py` holds the plan itself (torch only, importing nothing above
`moe/`); this command composes the training config with Hydra, as moe.train
does, and prints `moe.plan.format_plan`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cluster.config import gpu_memory_bytes, memory_plan, model_config_from, register_configs
from moe.model import count_parameters
from moe.plan import format_plan

# An absolute path: Hydra resolves a relative one against the calling module.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

def main() -> None:
    """`python -m cluster.plan +experiment=NAME [overrides]`: the plan of a training config (Hydra, like moe.train)."""
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def plan(cfg: DictConfig) -> None:
        vocab_note = ""
        vocab_size = cfg.model.vocab_size
        if vocab_size is None:  # training takes it from the prepared tokenizer; its configured size here
            vocab_size = cfg.data.vocab_size
            vocab_note = f" (model.vocab_size null: data.vocab_size {vocab_size} assumed)"
        try:
            model_config = model_config_from(cfg, vocab_size)
            result = memory_plan(cfg, model_config)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        memory = gpu_memory_bytes(cfg)
        counts = count_parameters(model_config)
        t, c = cfg.trainer, cfg.cluster
        print(f"{cfg.name}: {counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active){vocab_note}")
        print(f"layout: {c.num_workers} ranks, ep={cfg.parallel.ep}, engine={t.engine}, dtype={t.dtype}, "
              f"micro-batch {result.tokens_per_micro_batch} tokens, "
              f"activation_checkpointing={t.activation_checkpointing}")
        print(format_plan(result, memory))
        if memory is not None and result.peak > memory:
            sys.exit(1)

    plan()


if __name__ == "__main__":
    main()
