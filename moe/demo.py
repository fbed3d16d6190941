"""A torch-only smoke run of the model: `python -m moe.demo`.

Trains a tiny byte-level MoE transformer for a few steps on the source of
Python's standard library and prints the loss, the balancing loss and the
expert load. Needs nothing but torch: it is the check to run on a bare GPU
machine. The full training job is `python -m moe.train`.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

from moe import ModelConfig, MoETransformer


def stdlib_bytes(limit: int) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--backend", default="grouped_mm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_seq_len=args.seq_len, experts=dict(num_experts=8, hidden_size=256,
                                                                backend=args.backend))
    model = MoETransformer(config).to(args.device)
    data = stdlib_bytes(2_000_000).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        window = torch.stack([data[o:o + args.seq_len + 1] for o in offsets.tolist()])
        out = model(window[:, :-1], targets=window[:, 1:])
        loss = out.loss + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            load = out.router_stats[0]["max_over_mean_load"].item()
            print(f"step {step:4d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.4f}  "
                  f"layer0 max/mean load {load:.2f}  {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
