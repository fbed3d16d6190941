"""What the Ray training tests share: a tiny corpus, a named tiny config, reading a run back."""

from __future__ import annotations

import random
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from cluster.config import register_configs
from cluster.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
register_configs()

# Named tiny sizes (never the real ones): 2 layers, 4 experts, sequences of 32.
DEBUG_OVERRIDES = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.max_seq_len=32", "model.experts.num_experts=4", "model.experts.hidden_size=32",
    "data.seq_len=32", "data.vocab_size=320", "data.validation_fraction=0.1", "data.prefetch=1",
    "trainer.global_batch_size=8", "trainer.warmup_steps=2", "trainer.lr=0.01", "trainer.eval_batches=2",
    "logger.wandb.mode=disabled", "logger.ray_metrics=false", "logger.progress_bar=false",
    "logger.plots=false",  # about 2 s a run; the single-worker test draws and checks them
    "cluster.cpus_per_worker=1",
]


def write_corpus(directory: Path, num_docs: int = 80) -> None:
    rng = random.Random(0)
    words = ["the", "expert", "router", "token", "sends", "each", "to", "two", "of", "eight", "layers", "model",
             "loss", "falls", "when", "balanced", "and", "grouped", "matrix", "multiply"]
    directory.mkdir(parents=True)
    for i in range(num_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            start = rng.randrange(len(words))
            sentences.append(" ".join(words[(start + k) % len(words)] for k in range(rng.randint(4, 9))) + ".")
        (directory / f"doc{i:03d}.txt").write_text(" ".join(sentences) + "\n")


def make_cfg(corpus: Path, run_root: Path, name: str, *overrides: str, experiment: str = "mixtral_tiny"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"+experiment={experiment}", *DEBUG_OVERRIDES, f"data.sources=[{corpus / 'text'}]",
            f"data.output={corpus / 'prepared'}", f"trainer.run_root={run_root}", f"name={name}", *overrides])


def prometheus_lines(names: list[str], timeout_s: float = 40.0) -> dict[str, list[str]]:
    """Samples of the given metrics on this node's Prometheus endpoint (Ray exports every ~10 s)."""
    import ray
    import requests

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {n: [l for l in text.splitlines() if l.startswith(n + "{")] for n in names}
        if all(found.values()) or time.monotonic() > deadline:
            assert all(found.values()), f"missing on the Prometheus endpoint: {[n for n in names if not found[n]]}"
            return found
        time.sleep(1.0)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}
