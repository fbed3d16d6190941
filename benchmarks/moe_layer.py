"""One MoE layer forward+backward per expert backend against a dense SwiGLU of equal active FLOPs.

    python benchmarks/moe_layer.py                 # CPU defaults: float32, T=4096, d=256, f=512, E=8, k=2
    python benchmarks/moe_layer.py --device cuda   # CUDA defaults: bfloat16, T=16384, d=1024, f=3584

Rows:
  dense          SwiGLU of width k*f on all T tokens (the same matmul FLOPs as the MoE)
  moe[<backend>] our MoELayer (router + dispatch + experts + combine) with that backend
  hf_mixtral_loop  the per-expert mask/index_add loop of Hugging Face's Mixtral block (a common baseline)

The rows run round-robin: every round times each row for `--iters` iterations (after
`--warmup` on the first round), and a row's figure is the median over all its timed
iterations, so a slow phase of a noisy machine hits every row alike. The JSON also has
the per-round medians of the ratio to dense (its spread shows the noise).

Prints a table (median ms, TFLOP/s of the expert matmuls, ratio to dense) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from moe import ModelConfig
from moe.experts import GroupedExperts
from moe.layer import FeedForward, MoELayer


def available_backends() -> list[str]:
    backends = ["loop", "grouped_mm"]
    try:
        GroupedExperts(1, 8, 8, "megablocks")
        backends.append("megablocks")
    except RuntimeError as err:
        print(f"# megablocks backend skipped: {err}")
    return backends


class HFMixtralLoop(torch.nn.Module):
    """The expert loop of transformers' Mixtral sparse block (mask, gather, index_add per expert)."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        routing = self.layer.router(x_BSD)
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        experts = self.layer.experts
        out_TD = torch.zeros_like(x_TD)
        expert_mask = F.one_hot(routing.topk_ids_TK, experts.num_experts).permute(2, 1, 0)
        for e in range(experts.num_experts):
            slot, token = torch.where(expert_mask[e])
            h = x_TD[token]
            h = (F.silu(h @ experts.w1_EDF[e]) * (h @ experts.w3_EDF[e])) @ experts.w2_EFD[e]
            out_TD.index_add_(0, token, h * routing.topk_weights_TK[token, slot, None])
        return out_TD.view_as(x_BSD)


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    grad = torch.randn_like(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + iters):
        x.grad = None
        module.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=4, help="timed iterations per row and round")
    parser.add_argument("--rounds", type=int, default=5)
    return parser


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark, prints the table and returns the summary (the JSON line's content)."""
    cuda = args.device.startswith("cuda")
    tokens = args.tokens or (16384 if cuda else 4096)
    hidden = args.hidden or (1024 if cuda else 256)
    ffn = args.ffn or (3584 if cuda else 512)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device = torch.device(args.device)

    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    flops = 3 * 2 * tokens * args.top_k * hidden * ffn * 3  # 3 matmuls, forward + 2x backward
    modules: dict[str, torch.nn.Module] = {"dense": FeedForward(hidden, args.top_k * ffn)}
    base_state = None
    for backend in available_backends():
        config = ModelConfig(vocab_size=8, hidden_size=hidden, num_heads=1, num_layers=1,
                             router=dict(top_k=args.top_k, aux_loss_coef=0.0),
                             experts=dict(num_experts=args.experts, hidden_size=ffn, backend=backend))
        layer = MoELayer(config)
        if base_state is None:
            base_state = layer.state_dict()
        layer.load_state_dict(base_state)  # same router and experts for every row
        modules[f"moe[{backend}]"] = layer
    modules["hf_mixtral_loop"] = HFMixtralLoop(modules["moe[loop]"])

    for module in modules.values():
        module.to(device=device, dtype=dtype)
        time_fwd_bwd(module, x, args.warmup, 0)
    times: dict[str, list[float]] = {name: [] for name in modules}
    round_ratios: dict[str, list[float]] = {name: [] for name in modules}
    for round_index in range(args.rounds):
        names = list(modules)
        if round_index % 2:
            names.reverse()  # no row always follows the same one
        round_times = {name: time_fwd_bwd(modules[name], x, 0, args.iters) for name in names}
        for name in modules:
            times[name] += round_times[name]
            round_ratios[name].append(statistics.median(round_times[name]) / statistics.median(round_times["dense"]))
    results = {name: statistics.median(values) for name, values in times.items()}

    dense = results["dense"]
    print(f"# device={device} ({torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}) "
          f"threads={torch.get_num_threads()} dtype={dtype} T={tokens} d={hidden} f={ffn} "
          f"E={args.experts} k={args.top_k} torch={torch.__version__}")
    print(f"{'row':<18}{'ms':>10}{'TFLOP/s':>10}{'x dense':>10}")
    rows = []
    for name, seconds in results.items():
        rows.append({"name": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "ratio_to_dense": seconds / dense,
                     "ratio_to_dense_per_round": [round(r, 4) for r in round_ratios[name]]})
        print(f"{name:<18}{seconds * 1e3:>10.2f}{flops / seconds / 1e12:>10.3f}{seconds / dense:>10.2f}")
    summary = {"benchmark": "moe_layer", "device": str(device), "dtype": str(dtype), "tokens": tokens, "hidden": hidden,
               "ffn": ffn, "experts": args.experts, "top_k": args.top_k, "rounds": args.rounds,
               "iters_per_round": args.iters, "rows": rows}
    if "moe[grouped_mm]" in results:
        summary["grouped_mm_speedup_over_loop"] = results["moe[loop]"] / results["moe[grouped_mm]"]
        summary["grouped_mm_speedup_over_hf_loop"] = results["hf_mixtral_loop"] / results["moe[grouped_mm]"]
    return summary


def main() -> None:
    print(json.dumps(run(parser().parse_args())))


if __name__ == "__main__":
    main()
