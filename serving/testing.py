"""Tiny serving fixtures for tests and drills (as `data_pipeline.testing` is for data): random-weight tiers over
real checkpoints, and a router whose decision is known in advance (it reads the prompt length only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def make_tier(directory: Path, tokenizer_json: str, hidden: int, seed: int) -> Path:
    """A random-weight 2-layer MoE checkpoint of width `hidden` with the given tokenizer.json, in `directory`."""
    import torch

    import moe

    torch.manual_seed(seed)
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    config = moe.ModelConfig(vocab_size=len(vocab), hidden_size=hidden, num_layers=2, num_heads=2, num_kv_heads=1,
                             max_seq_len=96, router=moe.RouterConfig(top_k=2),
                             experts=moe.ExpertsConfig(num_experts=4, hidden_size=hidden))
    moe.save_checkpoint(moe.MoETransformer(config), directory)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    return directory


def length_router(path: Path, split: int, *, hidden: Any = None, deferral: Any = None) -> Path:
    """A router.json that scores by prompt length: P(large) >= 0.5 exactly when the prompt has more than `split`
    tokens. `hidden` (a `HiddenFeatures`) adds weight 1 on each hidden-state column (a probe: random-init states
    shift the score by ~0.1, too little to change a decision); `deferral` is stored as its post-hoc rule."""
    from moe.difficulty import SIGNAL_NAMES, DifficultyRouter

    weights = [0.0] * len(SIGNAL_NAMES) + ([1.0] * hidden.width if hidden is not None else [])
    weights[SIGNAL_NAMES.index("prompt_tokens")] = 1.0
    width = len(weights)
    router = DifficultyRouter(signal_names=tuple(SIGNAL_NAMES), mean=[0.0] * width, std=[1.0] * width,
                              weights=weights, bias=-(split + 0.5), threshold=0.5,
                              fraction_thresholds=[[0.0, 1.0], [1.0, 0.0]], posthoc_threshold=0.5, hidden=hidden,
                              deferral=deferral)
    router.save(path)
    return path


def tiny_pair(root: Path, texts: list[str], split: int) -> dict[str, Path]:
    """`small` (width 16) and `large` (width 32) tiers over one tokenizer trained on `texts`, and a length router
    (`router`) sending prompts of more than `split` tokens to the large tier, under `root`."""
    from data_pipeline.tokenize import train_tokenizer

    tokenizer_json = train_tokenizer(texts, vocab_size=300, eos_token="<|endoftext|>").to_str()
    return {"small": make_tier(root / "small", tokenizer_json, hidden=16, seed=1),
            "large": make_tier(root / "large", tokenizer_json, hidden=32, seed=2),
            "router": length_router(root / "router.json", split)}


__all__ = ["length_router", "make_tier", "tiny_pair"]
