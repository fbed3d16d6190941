"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second torch thread only adds spinning when other tests share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_tier(data, steps: int, hidden_size: int, seed: int):
    """A few AdamW steps on the prepared training split (the large tier gets more, and is wider)."""
    from data_pipeline.loader import CurriculumLoader
    from moe import ModelConfig, MoETransformer

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_seq_len=64, experts=dict(num_experts=4, hidden_size=32))
    model = MoETransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = CurriculumLoader(data, seq_len=32, global_batch_size=8, prefetch=0)
    for _, batch in zip(range(steps), loader):
        out = model(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["targets"])
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def cascade_pair(tmp_path_factory):
    """A tiny prepared corpus and two tiers trained on it: runs/small (untrained, with a config.yaml naming
    the data, as moe.train writes) and runs/large (150 steps, wider). Tests must not modify them."""
    import shutil

    from data_pipeline.prepare import prepare
    from data_pipeline.testing import make_corpus, tiny_data_config
    from moe import save_checkpoint

    root = tmp_path_factory.mktemp("cascade_pair")
    make_corpus(root / "corpus", num_text=60)
    data = prepare(tiny_data_config(root / "corpus", root / "prepared", validation_fraction=0.5))
    checkpoints = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, steps, hidden_size, seed in (("small", 0, 32, 0), ("large", 150, 64, 1)):
            directory = save_checkpoint(_train_tier(data, steps, hidden_size, seed),
                                        root / "runs" / name / "checkpoints" / "step_00000010")
            shutil.copyfile(data / "tokenizer.json", directory / "tokenizer.json")
            checkpoints[name] = directory
    finally:
        torch.set_num_threads(threads)
    (root / "runs" / "small" / "config.yaml").write_text(f"data:\n  output: {data}\n  seq_len: 32\n")
    return {"root": root, "data": data, **checkpoints}
