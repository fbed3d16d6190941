"""The GPU measurements of the training path, with nothing but torch (and pyyaml) installed.

    python benchmarks/gpu_suite.py                          # CUDA: MoE layer at the CUDA defaults + mixtral_small step
    python benchmarks/gpu_suite.py --skip-layer --recompute selective --no-compile
    python benchmarks/gpu_suite.py --device cpu --model mixtral_tiny --batch 2 --seq-len 64 --steps 2 \\
        --skip-layer --no-compile                           # the smoke run the tests do

Two parts, one table each and one JSON line at the end:
1. `benchmarks/moe_layer.py` at its CUDA defaults (bf16, T=16384, d=1024,
   f=3584, E=8, k=2): our MoE layer per backend against a dense SwiGLU of
   equal active FLOPs, rounds interleaved.
2. Training steps of a preset (default `mixtral_small`, read from
   conf/model/NAME.yaml without Hydra) on one device through the trainer's own
   code: `moe.MoETransformer` (the preset's attention backend unless
   --attention says otherwise) with `set_activation_checkpointing` and
   `compile_blocks` (trainer.activation_checkpointing, trainer.compile),
   bf16 autocast as trainer.dtype=bfloat16 does, the trainer's engine
   (`cluster.engine`: --engine fsdp wraps the model in FSDP2 over a one-rank
   process group, as trainer.engine=fsdp does; native is our all-reduce engine,
   a no-op on one rank) with its AdamW and gradient clipping at 1.0, packed
   documents (doc_ids) as the data pipeline produces them, loss + aux loss. Reports tokens/s, model TFLOP/s
   (`moe.model.training_flops_per_token`: 6 x active parameters + attention),
   MFU against the device's dense bf16 peak (`moe.model.PEAK_BF16_TFLOPS`) and
   the peak memory allocated, next to the peak `moe.plan` predicts.

Gradient all-reduce and expert parallelism are not exercised (one device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster.engine import build_engine  # noqa: E402  (torch only)
from cluster.parallel_dims import ParallelDims  # noqa: E402
from cluster.schema import TrainerConfig  # noqa: E402
from moe import ModelConfig, MoETransformer  # noqa: E402
from moe.model import peak_bf16_tflops, training_flops_per_token  # noqa: E402
from moe.plan import plan_memory  # noqa: E402


def preset_config(name: str, vocab_size: int) -> ModelConfig:
    """conf/model/NAME.yaml as a ModelConfig (Hydra's `defaults` entry dropped, vocab_size filled in)."""
    import yaml

    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: --model: {path} does not exist")
    values = yaml.safe_load(path.read_text())
    values.pop("defaults", None)
    values["vocab_size"] = values.get("vocab_size") or vocab_size
    return ModelConfig.from_dict(values)


def packed_batch(batch: int, seq_len: int, vocab_size: int, device: torch.device, generator: torch.Generator):
    """Random tokens in packed documents of 64..seq_len tokens, as the loader's batches look."""
    ids = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=generator)
    doc_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        start, doc = 0, 0
        while start < seq_len:
            length = int(torch.randint(min(64, seq_len), seq_len + 1, (1,), generator=generator))
            doc_ids[row, start:start + length] = doc
            start, doc = start + length, doc + 1
    return ids[:, :-1].to(device), doc_ids.to(device), ids[:, 1:].to(device)


def train_steps(args: argparse.Namespace, device: torch.device) -> dict:
    config = preset_config(args.model, args.vocab_size)
    config.max_seq_len = max(config.max_seq_len, args.seq_len)
    if args.attention is not None:
        config.attention_backend = args.attention
    torch.manual_seed(0)
    model = MoETransformer(config).to(device)
    model.set_activation_checkpointing(args.recompute)
    if args.compile:
        model.compile_blocks()
    engine = build_engine(model, one_rank(device, args.engine),
                          TrainerConfig(engine=args.engine, weight_decay=0.1, lr=3e-4, beta1=0.9, beta2=0.95,
                                        grad_clip=1.0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    generator = torch.Generator().manual_seed(0)
    batches = [packed_batch(args.batch, args.seq_len, config.vocab_size, device, generator) for _ in range(2)]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids, doc_ids, targets = batches[step % len(batches)]
        sync()
        start = time.perf_counter()
        with autocast:
            out = model(ids, doc_ids=doc_ids, targets=targets)
        engine.backward(out.loss + out.aux_loss)
        engine.step(3e-4, True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(out.loss.item())
    step_s = statistics.median(times)
    tokens_per_s = args.batch * args.seq_len / step_s
    flops_per_token = training_flops_per_token(config, args.seq_len)
    tflops = tokens_per_s * flops_per_token / 1e12
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_bf16_tflops(name) if cuda else None
    plan = plan_memory(config, micro_batch=args.batch, seq_len=args.seq_len, activation_checkpointing=args.recompute,
                       bf16=args.dtype == "bfloat16", engine=args.engine)
    return {"model": args.model, "device": name, "engine": args.engine, "batch": args.batch, "seq_len": args.seq_len,
            "dtype": args.dtype, "attention": config.attention_backend,
            "activation_checkpointing": args.recompute, "compile": args.compile,
            "step_s": step_s, "tokens_per_s": tokens_per_s, "tflops": tflops,
            "mfu": None if peak is None else tflops / peak, "peak_tflops": peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
            "planned_peak_gib": plan.peak / 2 ** 30,  # moe.plan's estimate, to check it on the GPU
            "flops_per_token": flops_per_token, "loss": losses[-1]}


def one_rank(device: torch.device, engine: str) -> ParallelDims:
    """The parallel degrees of one rank; FSDP needs a process group, so a one-rank one is made here."""
    import torch.distributed as dist

    dims = ParallelDims(world_size=1)
    if engine == "fsdp":
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:0",
                                    rank=0, world_size=1)
        dims.build(0)
    return dims


def print_train_table(result: dict) -> None:
    mfu = "n/a" if result["mfu"] is None else f"{result['mfu']:.1%}"
    memory = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f}"
    print(f"# {result['model']} training step on {result['device']} (engine={result['engine']}): "
          f"batch {result['batch']} x {result['seq_len']}, "
          f"{result['dtype']}, attention={result['attention']}, "
          f"activation_checkpointing={result['activation_checkpointing']}, "
          f"compile={result['compile']}")
    print(f"{'step s':>8}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'planned GiB':>13}")
    print(f"{result['step_s']:>8.3f}{result['tokens_per_s']:>12.0f}{result['tflops']:>10.1f}{mfu:>8}{memory:>10}"
          f"{result['planned_peak_gib']:>13.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="mixtral_small")
    parser.add_argument("--vocab-size", type=int, default=32768, help="mixtral_small's data.vocab_size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--attention", choices=["sdpa", "flex"], default=None,
                        help="model.attention_backend (default: the preset's; mixtral_small uses flex)")
    parser.add_argument("--recompute", choices=["none", "full", "selective"], default="none")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--engine", choices=["fsdp", "native"], default="fsdp", help="trainer.engine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-layer", action="store_true", help="skip the MoE layer benchmark")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here (use --device cpu for a smoke run)")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    summary: dict = {"benchmark": "gpu_suite", "torch": torch.__version__}
    if not args.skip_layer:
        import moe_layer

        summary["moe_layer"] = moe_layer.run(moe_layer.parser().parse_args(["--device", args.device]))
    result = train_steps(args, device)
    print_train_table(result)
    summary["train"] = result
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
