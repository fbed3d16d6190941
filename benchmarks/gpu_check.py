"""The first thing to run on a GPU machine: do the GPU paths work and agree with their references?

    python benchmarks/gpu_check.py [--out gpu_check.json] [--device cuda] [--quick]

Needs torch only (the lent GPU machines have torch, not Ray or Hydra). Each check
prints one line and goes into one JSON:
  - versions: torch, CUDA, the driver, the device;
  - flex: FlexAttention with a document + sliding-window block mask, forward and
    backward in bf16, against SDPA with the same mask as a dense boolean mask;
  - grouped_mm: the bf16 grouped GEMM experts, forward and backward, with an
    expert that gets no token, against the per-expert loop;
  - rope dtypes: q, k and v reach attention in one dtype under bf16 autocast;
  - compiled_decode: the compiled decoding step (`moe.decode`) against the eager
    one, bf16 weights and inductor's Triton kernels (aot_eager on the CPU);
  - gpu_suite: a short `benchmarks/gpu_suite.py` run of mixtral_tiny (tokens/s,
    MFU, peak memory against the plan), and `benchmarks/moe_layer.py`.
With `--device cpu` (the test suite's smoke run) the flex backward, which torch
has no CPU kernel for, and the two benchmark runs are skipped and say so, and the
block mask is built without compiling it.
  - fsdp_parity (2+ GPUs, or `--parity-on-cpu`): two processes, expert parallelism
    at ep = world (each expert-data-parallel group one rank), FSDP2 against the
    native engine over 3 AdamW steps on the same batches: the losses, the
    gradient norms and the weights must agree (issue 18, W1: the expert gradients'
    division by the world size must not depend on FSDP2's one-rank branch). NCCL
    on GPUs; gloo on the CPU (`--parity-on-cpu`, tests/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def versions(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info["name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["driver"] = f"unknown ({type(err).__name__})"
        major = info["driver"].split(".")[0]
        if (torch.version.cuda or "").startswith("13") and major.isdigit():
            info["driver_ok"] = int(major) >= 580  # CUDA 13 wheels need driver 580+ (issue 18, C5)
    return info


def check_flex(device: str) -> dict:
    from moe.model import attention_mask, flex_block_mask

    torch.manual_seed(0)
    batch, heads, seq, head_dim = 2, 4, 256, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=device == "cuda")
               for _ in range(3))
    docs = torch.cat([torch.zeros(batch, 100, dtype=torch.long), torch.ones(batch, seq - 100, dtype=torch.long)],
                     1).to(device)
    # On the CPU (the suite's smoke run) the mask is built eagerly: the compiled build is tests/test_model.py's,
    # and compiling it here cost ~10 s of a cold run for nothing the smoke run checks.
    block_mask = flex_block_mask(seq, torch.device(device), 64, docs, compiled=device == "cuda")
    dense = attention_mask(seq, torch.device(device), 64, docs)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention) if device == "cuda" else flex_attention
    out = flex(q, k, v, block_mask=block_mask)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    result = {"forward_max_abs_diff": (out.float() - reference.float()).abs().max().item(), "dtype": str(dtype)}
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = result["forward_max_abs_diff"] < tolerance
    if device == "cuda":
        grad = torch.randn_like(out)
        flex_grads = torch.autograd.grad(out, (q, k, v), grad)
        ref_grads = torch.autograd.grad(reference, (q, k, v), grad)
        result["backward_max_abs_diff"] = max((a.float() - b.float()).abs().max().item()
                                              for a, b in zip(flex_grads, ref_grads))
        ok = ok and result["backward_max_abs_diff"] < 5 * tolerance
    else:
        result["backward"] = "skipped: torch has no CPU backward for FlexAttention"
    return {**result, "ok": ok}


def check_grouped_mm(device: str) -> dict:
    from moe.experts import grouped_mm_experts, loop_experts

    torch.manual_seed(0)
    experts, hidden, ffn = 4, 128, 256
    tokens = torch.tensor([96, 0, 160, 64], device=device)  # expert 1 gets no token
    dtype = torch.bfloat16
    x = torch.randn(int(tokens.sum()), hidden, device=device, dtype=dtype, requires_grad=True)
    weights = [(torch.randn(experts, *shape, device=device, dtype=dtype) * 0.05).requires_grad_()
               for shape in ((hidden, ffn), (ffn, hidden), (hidden, ffn))]
    out = grouped_mm_experts(x, tokens, *weights)
    grads = torch.autograd.grad(out.float().square().sum(), (x, *weights))
    # The reference: the loop in float32 from the same bf16 values.
    x32 = x.detach().float().requires_grad_()
    w32 = [w.detach().float().requires_grad_() for w in weights]
    ref = loop_experts(x32, tokens, *w32)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x32, *w32))
    rel = (out.float() - ref).norm().item() / ref.norm().item()
    grad_rel = max((a.float() - b).norm().item() / max(b.norm().item(), 1e-12) for a, b in zip(grads, ref_grads))
    empty_grad = grads[1][1].float().abs().max().item()  # w1 of the expert without tokens
    return {"forward_rel_err": rel, "backward_rel_err": grad_rel, "empty_expert_grad_max": empty_grad,
            "ok": rel < 2e-2 and grad_rel < 5e-2 and empty_grad == 0.0}


def check_rope_dtypes(device: str) -> dict:
    import moe.model as model_module
    from moe import ExpertsConfig, ModelConfig, MoETransformer

    seen = []
    sdpa = model_module.F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append([str(t.dtype) for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    model_module.F.scaled_dot_product_attention = recording
    try:
        config = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             max_seq_len=32, experts=ExpertsConfig(num_experts=4, hidden_size=64))
        model = MoETransformer(config).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            model(torch.randint(0, 64, (2, 32), device=device)).logits.float().sum().backward()
    finally:
        model_module.F.scaled_dot_product_attention = sdpa
    return {"qkv_dtypes": seen[0], "ok": all(d == ["torch.bfloat16"] * 3 for d in seen)}


def check_compiled_decode(device: str) -> dict:
    """`moe.decode.CompiledDecoder` (`Generator(compile_decode=True)`) against the eager cached step: 3 rows at
    different lengths for 8 steps, then 1 row for 8 (the two graphs). On a GPU: bf16 weights, inductor (Triton
    kernels); on the CPU smoke run: float32 with the aot_eager backend (tests/test_decode.py runs inductor on
    the CPU). Reports the logits' relative error, whether the greedy tokens agree (bf16 may flip a near-tie),
    the graphs compiled, and the median time per step of each after the first two of a phase."""
    import statistics

    from torch._dynamo.utils import counters

    from moe import ExpertsConfig, ModelConfig, MoETransformer, RouterConfig
    from moe.decode import CompiledDecoder
    from moe.model import KVCache

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                         experts=ExpertsConfig(num_experts=8, hidden_size=128), router=RouterConfig(top_k=2))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = MoETransformer(config).to(device=device, dtype=dtype).eval()
    backend = "inductor" if device == "cuda" else "aot_eager"
    decoder = CompiledDecoder(model, backend=backend)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    padded = torch.zeros(3, 7, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        padded[row, :len(ids)] = torch.tensor(ids)

    def synced() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    caches = {name: KVCache(config.num_layers, 3, capacity=8) for name in ("eager", "compiled")}
    graphs_before = counters["stats"]["unique_graphs"]
    worst, tokens_agree, times = 0.0, True, {"eager": [], "compiled": []}
    with torch.no_grad():
        for cache in caches.values():
            logits = model(padded, cache=cache, input_lengths=[len(p) for p in prompts]).logits
        logits = logits[torch.arange(3), torch.tensor([len(p) - 1 for p in prompts])]
        for rows in (None, [0]):
            if rows is not None:
                caches = {name: cache.select(rows) for name, cache in caches.items()}
                logits = logits[rows]
            for step in range(8):
                tokens = logits.argmax(-1, keepdim=True)
                started = synced()
                out = decoder(tokens, caches["compiled"])
                compiled_s = synced() - started
                logits = model(tokens, cache=caches["eager"]).logits[:, -1]
                eager_s = synced() - started - compiled_s
                if step >= 2:
                    times["compiled"].append(compiled_s)
                    times["eager"].append(eager_s)
                worst = max(worst, ((out.logits_BV.float() - logits.float()).norm() / logits.float().norm()).item())
                tokens_agree &= out.greedy_B.tolist() == logits.argmax(-1).tolist()
    graphs = counters["stats"]["unique_graphs"] - graphs_before
    return {"backend": backend, "dtype": str(dtype), "max_rel_err": worst, "greedy_tokens_agree": tokens_agree,
            "graphs_compiled": graphs,
            **{f"{name}_ms_per_step": 1e3 * statistics.median(values) for name, values in times.items()},
            "ok": worst < (2e-2 if dtype == torch.bfloat16 else 1e-4) and graphs == 2}


def _parity_worker(rank: int, world_size: int, port: int, device_type: str, out: str) -> None:
    import torch.distributed as dist

    from cluster.engine import FSDPEngine, NativeEngine
    from cluster.expert_parallel import apply_expert_parallel, gather_full_state_dict
    from cluster.parallel_dims import ParallelDims
    from cluster.schema import TrainerConfig
    from moe import ExpertsConfig, ModelConfig, MoETransformer

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        dims = ParallelDims(world_size=world_size, ep=world_size).build(rank)
        config = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             max_seq_len=32, experts=ExpertsConfig(num_experts=2 * world_size, hidden_size=64))
        runs = {}
        for name, engine_class in (("native", NativeEngine), ("fsdp", FSDPEngine)):
            torch.manual_seed(0)
            model = apply_expert_parallel(MoETransformer(config), dims).to(device)
            engine = engine_class(model, dims, TrainerConfig(engine=name, lr=1e-2, grad_clip=0.0))
            data = torch.Generator().manual_seed(rank)  # each rank its own batches, the same for both engines
            losses, norms = [], []
            for _ in range(3):
                ids = torch.randint(0, 128, (4, 32), generator=data).to(device)
                output = model(ids, targets=ids)
                engine.backward(output.loss + output.aux_loss)
                norm, stepped = engine.step(1e-2, True)
                assert stepped
                losses.append(float(output.loss.detach()))
                norms.append(norm)
            runs[name] = (losses, norms, gather_full_state_dict(model, dims))
        (losses_a, norms_a, state_a), (losses_b, norms_b, state_b) = runs["native"], runs["fsdp"]
        weight_diff = max(float((state_a[k].float() - state_b[k].float()).abs().max()) for k in state_a)
        expert_diff = max(float((state_a[k].float() - state_b[k].float()).abs().max()) for k in state_a
                          if ".experts." in k)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "world_size": world_size, "losses": [losses_a, losses_b], "grad_norms": [norms_a, norms_b],
                "max_weight_diff": weight_diff, "max_expert_weight_diff": expert_diff,
                "ok": weight_diff < 1e-4 and max(abs(a - b) for a, b in zip(norms_a, norms_b)) < 1e-4 * max(norms_a)}))
    finally:
        dist.destroy_process_group()


def check_fsdp_parity(device: str, world_size: int) -> dict:
    """FSDP2 against the native engine at ep = world on `world_size` processes (see the module docstring)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "parity.json"
        mp.start_processes(_parity_worker, args=(world_size, port, device, str(out)), nprocs=world_size,
                           join=True, start_method="spawn")
        return json.loads(out.read_text())


def run_script(args: list[str], timeout: int) -> dict:
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    return {"ok": result.returncode == 0, "seconds": round(time.monotonic() - started, 1),
            "output_tail": (result.stdout + result.stderr)[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="skip the gpu_suite and moe_layer runs")
    parser.add_argument("--parity-on-cpu", action="store_true",
                        help="run the FSDP/native parity check on 2 CPU processes (gloo) instead of 2+ GPUs")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda, and torch sees no CUDA device (use --device cpu for a smoke run)\n")
    report: dict = {"versions": versions(args.device)}
    print(json.dumps(report["versions"]), flush=True)
    checks = {"flex": check_flex, "grouped_mm": check_grouped_mm, "rope_dtypes": check_rope_dtypes,
              "compiled_decode": check_compiled_decode}
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if gpus >= 2 or args.parity_on_cpu:
        checks["fsdp_parity"] = lambda device: check_fsdp_parity("cuda" if gpus >= 2 else "cpu", max(2, gpus))
    else:
        report["fsdp_parity"] = {"skipped": f"needs 2 GPUs, {gpus} visible (or --parity-on-cpu)"}
    for name, check in checks.items():
        try:
            report[name] = check(args.device)
        except Exception as err:  # one failing check must not hide the others
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps({k: v for k, v in report[name].items() if k != "trace"}), flush=True)
    if args.device == "cuda" and not args.quick:
        report["gpu_suite"] = run_script(["benchmarks/gpu_suite.py", "--model", "mixtral_tiny", "--vocab-size",
                                          "4096", "--batch", "8", "--seq-len", "256", "--steps", "5", "--warmup",
                                          "2"], 240)
        report["moe_layer"] = run_script(["benchmarks/moe_layer.py", "--device", "cuda", "--rounds", "3"], 120)
        for name in ("gpu_suite", "moe_layer"):
            print(name, "ok" if report[name]["ok"] else "FAILED", report[name].get("output_tail", "")[-600:],
                  flush=True)
    else:
        report["benchmarks"] = "skipped (--quick or not on a GPU)"
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ok": report["ok"], "out": str(args.out)}))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
