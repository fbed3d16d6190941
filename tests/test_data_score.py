"""The perplexity metric under a reference `moe` checkpoint (data.score_with)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from data_pipeline.curriculum import pace
from data_pipeline.loader import CurriculumLoader
from data_pipeline.prepare import prepare
from data_pipeline.testing import make_corpus, tiny_data_config

moe = pytest.importorskip("moe")

VOCAB = 320
SCORE_SEQ_LEN = 32
# Named tiny size for tests (never the real ones).
DEBUG_MODEL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                   experts=dict(num_experts=4, hidden_size=32, backend="loop"))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    make_corpus(root / "corpus", num_text=20, num_jsonl=5, num_parquet=5)
    torch.manual_seed(0)
    model = moe.MoETransformer(moe.ModelConfig(**DEBUG_MODEL))
    checkpoint = moe.save_checkpoint(model, root / "checkpoint")
    out = prepare(tiny_data_config(root / "corpus", root / "prepared", score_with=str(checkpoint),
                                   score_seq_len=SCORE_SEQ_LEN))
    rows = []
    for path in sorted(out.glob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            rows += ipc.open_stream(source).read_all().to_pylist()
    return out, moe.load_checkpoint(checkpoint).eval(), rows, checkpoint


def reference_perplexity(model, tokens: list[int], window: int) -> float:
    """Window by window, one forward each, in float64 accumulation."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = torch.tensor(tokens[start:start + window + 1])[None]
        with torch.no_grad():
            logits = model(chunk[:, :-1]).logits.double()
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def test_perplexity_matches_the_reference_model(scored) -> None:
    out, model, rows, _ = scored
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["metrics"]) == {"length", "compression", "rarity", "perplexity"}
    short = [r for r in rows if r["n_tokens"] <= SCORE_SEQ_LEN + 1][:3]
    long = [r for r in rows if r["n_tokens"] > 3 * SCORE_SEQ_LEN][:3]
    assert short and long
    for row in short:  # one window: the plain definition
        tokens = torch.tensor(row["tokens"])[None]
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits
        expected = math.exp(torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:]).item())
        assert row["perplexity"] == pytest.approx(expected, rel=1e-4)
    for row in long:
        assert row["perplexity"] == pytest.approx(reference_perplexity(model, row["tokens"], SCORE_SEQ_LEN), rel=1e-4)
    # An untrained model is close to uniform over the vocabulary.
    assert all(0.5 * VOCAB < r["perplexity"] < 2 * VOCAB for r in rows)


def test_loader_paces_by_perplexity(scored) -> None:
    out, _, rows, _ = scored
    percentile = {r["doc_id"]: r["perplexity_pct"] for r in rows}
    loader = CurriculumLoader(out, seq_len=8, global_batch_size=4, prefetch=0, shuffle_buffer=4,
                              schedule="fixed_linear", metric="perplexity", total_curriculum_step=10,
                              min_difficulty=20)
    batches = iter(loader)
    for step in range(3):
        batch = next(batches)
        assert max(percentile[d] for d in batch["doc_ids"].flatten().tolist()) <= pace(step, loader.curriculum)


def test_checkpoint_with_a_smaller_vocabulary_is_refused(scored, tmp_path) -> None:
    out, _, _, _ = scored
    small = moe.save_checkpoint(moe.MoETransformer(moe.ModelConfig(**{**DEBUG_MODEL, "vocab_size": 100})),
                                tmp_path / "small")
    make_corpus(tmp_path / "corpus", num_text=3, num_jsonl=1, num_parquet=1)
    with pytest.raises(ValueError, match="data.score_with"):
        prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "out", score_with=str(small)))
    with pytest.raises(FileNotFoundError, match="data.score_with"):
        prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "out", score_with=str(tmp_path / "nothing")))
