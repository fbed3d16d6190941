"""The training loop that runs inside each Ray Train worker.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU)
when `train_loop_per_worker` starts. It reads like nanoGPT's loop: `setup`
(model with the same seed on every rank, expert parallelism, engine, this
rank's share of the curriculum batches), `resume_point`, then `train_step`
calls that each return a `StepStats`, with logging (`train_record`),
checkpointing (`save_checkpoint`) and evaluation (`evaluate`) as separate calls.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moe import MoETransformer
from moe.checkpoint import SHARDED_WEIGHTS_DIR, WEIGHTS_NAME, is_sharded_checkpoint
from moe.distill import distillation_loss
from moe.files import TOKENIZER_NAME
from moe.model import count_parameters, training_flops_per_token

from cluster.checkpointing import (full_model_writer, list_checkpoints, load_training_checkpoint,
                                  read_train_state_or_none, save_training_checkpoint)
from cluster.diagnostics import RoutingProbe, expert_weight_norms
from cluster.engine import TrainEngine, build_engine
from cluster.expert_parallel import apply_expert_parallel, gather_full_state_dict
from cluster.initial_weights import read_initial_state
from cluster.metrics import MetricsLogger, NullLogger
from cluster.optim import lr_at
from cluster.parallel_dims import ParallelDims, all_gather_objects
from cluster.reshard import Layout, reshard_optimizer_state
from cluster.schema import TrainerConfig, WorkerConfig
from cluster.sharded_checkpoint import ShardedCheckpointer
from cluster.teacher import load_teacher, teacher_flops_per_token

STATUS_FILE = "status.json"


def start_checkpoint(checkpoint_root: Path, config: WorkerConfig) -> Optional[Path]:
    """The checkpoint this worker group starts from.

    The driver chose `config.resume_from` before Ray started (verified, and
    newer checkpoints set aside). After a worker failure Ray Train restarts the
    group within the same launch: then the newest checkpoint this launch wrote wins.
    """
    for path in reversed(list_checkpoints(checkpoint_root)):
        state = read_train_state_or_none(path)
        if state is not None and state.get("launch_id") == config.launch_id:
            return path
    return Path(config.resume_from) if config.resume_from else None


@dataclass
class WorkerRun:
    """Everything one worker trains with, and where it stands (step, bad steps, tokens seen)."""

    config: WorkerConfig  # from the driver
    rank: int
    world_size: int
    device: torch.device
    dims: ParallelDims
    model: MoETransformer
    engine: TrainEngine
    loader: Any  # data_pipeline.loader.CurriculumLoader
    autocast: Any
    probe: Optional[RoutingProbe] = None  # trainer.diagnostics_every > 0 and the model has MoE layers
    teacher: Optional[MoETransformer] = None  # trainer.distill.teacher, frozen
    checkpointer: Optional[ShardedCheckpointer] = None  # trainer.checkpoint_format=sharded
    step: int = 0
    bad_steps: int = 0
    tokens: int = 0

    @property
    def trainer(self) -> TrainerConfig:
        return self.config.trainer

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class StepStats:
    """One optimizer step, reduced over micro-batches and ranks (per-layer tensors: one entry per MoE layer)."""

    lm_loss: float
    aux_loss: float
    kd_loss: float  # the distillation loss (0 without a teacher)
    grad_norm: float
    stepped: bool
    difficulty: float  # the curriculum pace of the step's batch
    tokens_per_expert_LE: torch.Tensor  # summed over micro-batches and ranks
    dropped_fraction_L: torch.Tensor  # mean over micro-batches and ranks
    router_entropy_L: torch.Tensor  # mean over micro-batches and ranks


def setup(config: WorkerConfig) -> WorkerRun:
    """Process group layout, model (the same seed on every rank), expert parallelism, engine, data."""
    import ray.train
    import ray.train.torch

    from data_pipeline.loader import CurriculumLoader

    tcfg = config.trainer
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda" and tcfg.dtype == "float32":  # issue 18, S4: torch's default is full float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tcfg.allow_tf32
        if rank == 0:
            print("[moe.train] trainer.dtype=float32 on a GPU: torch's float32 grouped_mm on CUDA falls back to "
                  "one GEMM per expert (with a host sync); trainer.dtype=bfloat16 is the fast path"
                  + ("; other matmuls use TF32 (trainer.allow_tf32)" if tcfg.allow_tf32 else ""), flush=True)
    dims = ParallelDims(world_size=world_size, ep=config.ep)
    dims.build(rank)

    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank
    model = MoETransformer(config.model)
    model.set_activation_checkpointing(tcfg.activation_checkpointing)
    apply_expert_parallel(model, dims)
    model.to(device)
    if tcfg.compile:
        model.compile_blocks()
    engine = build_engine(model, dims, tcfg)
    loader = CurriculumLoader.from_config(config.data, global_batch_size=tcfg.global_batch_size, rank=rank,
                                          world_size=world_size, data_dir=config.data_dir)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tcfg.dtype == "bfloat16" else nullcontext())
    probe = None
    if tcfg.diagnostics_every and model.config.first_k_dense < model.config.num_layers:
        probe = routing_probe(config, rank, world_size)
    # The teacher is replicated on every worker and runs on that worker's micro-batches (no expert parallelism).
    teacher = load_teacher(tcfg.distill.teacher, device) if tcfg.distill.teacher is not None else None
    checkpointer = ShardedCheckpointer(model, dims, device) if tcfg.checkpoint_format == "sharded" else None
    return WorkerRun(config, rank, world_size, device, dims, model, engine, loader, autocast, probe, teacher,
                     checkpointer)


PROBE_SEQUENCES = 8


def routing_probe(config: WorkerConfig, rank: int, world_size: int) -> RoutingProbe:
    """The fixed tokens whose routing `diagnose` follows: this rank's first validation sequences."""
    from data_pipeline.loader import CurriculumLoader

    loader = CurriculumLoader.from_config(config.data, global_batch_size=config.trainer.global_batch_size,
                                          rank=rank, world_size=world_size, split="validation",
                                          data_dir=config.data_dir)
    batch = next(iter(loader))
    return RoutingProbe(batch["input_ids"][:PROBE_SEQUENCES], batch["doc_ids"][:PROBE_SEQUENCES])


def diagnose(run: WorkerRun) -> dict[str, Any]:
    """The diagnostics record of the current step (all ranks take part; see cluster/diagnostics.py)."""
    changed = run.probe.measure(run.model, run.autocast)
    run.engine.end_inference()
    return {"kind": "diagnostics", "step": run.step,
            "expert_weight_norm": expert_weight_norms(run.model, run.dims).tolist(),
            "topk_change_fraction": changed}


def resume_point(run: WorkerRun) -> Optional[str]:
    """Loads the starting checkpoint (see `start_checkpoint`) into the run, or else the trainer.init_from
    weights (step 0, fresh optimizer and data); returns what was loaded, for the log."""
    path = start_checkpoint(run.checkpoint_root, run.config)
    if path is None:
        if run.config.init_from is None:
            return None
        run.engine.load_model_state(read_initial_state(Path(run.config.init_from), run.model.config))
        return f"started from the weights in {run.config.init_from}"
    train_state = load_training_checkpoint(path, run.rank)
    here = Layout(run.trainer.engine, run.dims.ep, run.world_size)
    writer = Layout.of_checkpoint(train_state, here)
    if writer.same_state_as(here):
        optimizer_state = load_file(str(path / f"optimizer_rank{run.rank}.safetensors"))
    else:
        optimizer_state = reshard_optimizer_state(path, writer, run.model, run.dims)
    if is_sharded_checkpoint(path):  # each rank reads the parts of the shards that it holds
        run.engine.load_sharded_model_state(path / SHARDED_WEIGHTS_DIR)
    else:
        run.engine.load_model_state(load_file(str(path / WEIGHTS_NAME)))
    run.engine.load_optimizer_state(optimizer_state)
    run.loader.load_state_dict(train_state["loader"])
    run.step, run.bad_steps, run.tokens = train_state["step"], train_state["bad_steps"], train_state["tokens"]
    moved = ("" if writer.same_state_as(here) else
             f" (optimizer state resharded from {writer.engine}, ep={writer.ep}, {writer.world_size} workers)")
    return f"resumed from {path} at step {run.step}{moved}"


def inject_faults(run: WorkerRun) -> None:
    """trainer.debug.kill_rank_at_step: that rank dies once (a marker file keeps the restart alive)."""
    debug = run.trainer.debug
    if debug.kill_rank_at_step == run.step and run.rank == debug.kill_rank:
        marker = run.run_dir / f".killed_at_{run.step}"
        if not marker.exists():
            marker.touch()
            print(f"[moe.train] debug: killing rank {run.rank} at step {run.step}", flush=True)
            os._exit(1)


def train_step(run: WorkerRun) -> StepStats:
    """One optimizer step: the micro-batches of this rank's batch, one all-reduce of the logged values,
    then the engine's reduce/clip/update (skipped on a NaN/inf loss or gradient). Advances run.step."""
    tcfg = run.trainer
    accum = tcfg.grad_accum_steps
    micro_batch = tcfg.global_batch_size // run.world_size // accum
    difficulty = run.loader.pace  # the curriculum pace of the batch about to be drawn
    batch = run.loader.next_batch()
    if run.device.type == "cuda":  # one pinned copy per step: the copies below then run asynchronously (S5)
        batch = {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    losses = torch.zeros(3, device=run.device)  # lm, aux, kd: summed over micro-batches
    layer_stats = []
    for micro in range(accum):
        rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
        input_ids = batch["input_ids"][rows].to(run.device, non_blocking=True)
        doc_ids = batch["doc_ids"][rows].to(run.device, non_blocking=True)
        targets = batch["targets"][rows].to(run.device, non_blocking=True)
        with run.autocast:
            out = run.model(input_ids, doc_ids=doc_ids, targets=targets,
                            loss_chunk_tokens=tcfg.loss_chunk_tokens or None)
        loss, kd_loss = out.loss, torch.zeros((), device=run.device)
        if run.teacher is not None:
            kd_loss = distill_loss(run, input_ids, doc_ids, targets, out.logits)
            loss = (1 - tcfg.distill.weight) * out.loss + tcfg.distill.weight * kd_loss
        loss = loss + out.aux_loss
        if run.step in tcfg.debug.nan_loss_at_steps:
            loss = loss * float("nan")
        run.engine.backward(loss / accum, sync=micro == accum - 1)
        losses += torch.stack([out.loss.detach().float(), out.aux_loss.detach().float(), kd_loss.detach().float()])
        layer_stats.append(out.router_stats)
    (lm_loss, aux_loss, kd_loss), tokens_LE, dropped_L, entropy_L = _reduce_stats(losses / accum, layer_stats, run)
    grad_norm, stepped = run.engine.step(lr_at(run.step, tcfg), math.isfinite(lm_loss) and math.isfinite(aux_loss))
    stats = StepStats(lm_loss, aux_loss, kd_loss, grad_norm, stepped, difficulty, tokens_LE, dropped_L, entropy_L)
    run.step += 1
    run.tokens += tcfg.global_batch_size * run.config.data.seq_len
    run.bad_steps += 0 if stepped else 1
    return stats


def distill_loss(run: WorkerRun, input_ids: torch.Tensor, doc_ids: torch.Tensor, targets: torch.Tensor,
                 student_logits: torch.Tensor) -> torch.Tensor:
    """The distillation loss of one micro-batch: the frozen teacher's forward pass (dropless, no gradient)."""
    distill = run.trainer.distill
    with torch.no_grad(), run.autocast:
        teacher_logits = run.teacher(input_ids, doc_ids=doc_ids, ignore_capacity=True).logits
    return distillation_loss(student_logits, teacher_logits, targets, temperature=distill.temperature,
                             kind=distill.kind)


def _reduce_stats(losses: torch.Tensor, layer_stats: list[list[dict[str, torch.Tensor]]], run: WorkerRun
                  ) -> tuple[list[float], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything logged in one collective: the losses, and per MoE layer the tokens per expert, the dropped
    fraction and the router entropy (as `StepStats` holds them)."""
    num_layers = len(layer_stats[0])

    def per_layer(key: str, reduce) -> torch.Tensor:
        if not num_layers:
            return torch.zeros(0)
        return torch.stack([reduce(torch.stack([s[i][key] for s in layer_stats])) for i in range(num_layers)])

    tokens_LE = per_layer("tokens_per_expert", lambda t: t.sum(0))
    dropped_L = per_layer("dropped_fraction", lambda t: t.mean())
    entropy_L = per_layer("router_entropy", lambda t: t.mean())
    flat = torch.cat([losses.cpu(), tokens_LE.flatten().float().cpu(), dropped_L.float().cpu(),
                      entropy_L.float().cpu()]).to(run.device)
    num_losses = len(losses)
    if run.world_size > 1:  # token counts are summed over ranks, the rest averaged
        dist.all_reduce(flat)
        flat[:num_losses] /= run.world_size
        flat[num_losses + tokens_LE.numel():] /= run.world_size
    flat = flat.cpu()
    sizes = [num_losses, tokens_LE.numel(), num_layers, num_layers]
    losses, tokens, dropped, entropy = torch.split(flat, sizes)
    return losses.tolist(), (tokens.view(num_layers, -1) if num_layers else tokens), dropped, entropy


def train_record(run: WorkerRun, stats: StepStats, elapsed_s: float, flops_per_token: float) -> dict[str, Any]:
    """The metrics.jsonl record of a step."""
    tokens_LE = stats.tokens_per_expert_LE
    step_tokens = run.trainer.global_batch_size * run.config.data.seq_len
    has_moe = tokens_LE.numel() > 0
    mean_load = tokens_LE.mean(-1) if has_moe else tokens_LE
    max_load = tokens_LE.max(-1).values if has_moe else tokens_LE
    return {"kind": "train", "step": run.step, "loss": stats.lm_loss, "aux_loss": stats.aux_loss,
            "kd_loss": stats.kd_loss if run.teacher is not None else None,
            "grad_norm": stats.grad_norm, "lr": lr_at(run.step - 1, run.trainer), "tokens": run.tokens,
            "tokens_per_s": step_tokens / elapsed_s, "step_time_s": elapsed_s, "skipped": not stats.stepped,
            "bad_steps": run.bad_steps, "difficulty": stats.difficulty,
            "tokens_per_expert": tokens_LE.tolist(), "max_load": max_load.tolist(), "mean_load": mean_load.tolist(),
            "max_over_mean_load": (max_load / mean_load.clamp_min(1e-9)).tolist() if has_moe else [],
            "min_over_mean_load": (tokens_LE.min(-1).values / mean_load.clamp_min(1e-9)).tolist() if has_moe else [],
            "dropped_fraction": stats.dropped_fraction_L.tolist(),
            "router_entropy": stats.router_entropy_L.tolist(),
            "grad_norm_by_group": dict(getattr(run.engine, "last_grad_norms", {})),
            "flops_per_token": flops_per_token}


def save_checkpoint(run: WorkerRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint of the current step (all ranks take part); Ray Train gets the metrics only.
    Returns the metrics.jsonl record of the save: how long the training loop was blocked (`stall_s`), and for
    a sharded checkpoint how much of that was waiting for the previous one's write (`waited_s`)."""
    import ray.train

    start = time.perf_counter()
    tcfg = run.trainer
    train_state = {"step": run.step, "bad_steps": run.bad_steps, "tokens": run.tokens,
                   "loader": run.loader.state_dict(), "world_size": run.world_size,
                   "engine": tcfg.engine, "ep": run.dims.ep, "launch_id": run.config.launch_id,
                   "checkpoint_format": tcfg.checkpoint_format,
                   "distill": ({"teacher": tcfg.distill.teacher, "teacher_sha256": run.config.teacher_sha256,
                                "weight": tcfg.distill.weight, "temperature": tcfg.distill.temperature,
                                "kind": tcfg.distill.kind} if run.teacher is not None else None)}
    common = dict(checkpoint_root=run.checkpoint_root, step=run.step, rank=run.rank,
                  model_config=run.model.config.to_dict(), train_state=train_state, keep_last=tcfg.keep_last,
                  tokenizer_file=Path(run.config.data_dir) / TOKENIZER_NAME)
    record = {"kind": "checkpoint", "step": run.step, "format": tcfg.checkpoint_format}
    if run.checkpointer is not None:  # written in the background; blocked only while the tensors are copied
        record["waited_s"] = run.checkpointer.save(save_training_checkpoint,
                                                   run.engine.optimizer_state(to_cpu=False), **common)
    else:
        full_state = gather_full_state_dict(run.model, run.dims, only_rank0=True)
        save_training_checkpoint(write_model=full_model_writer(full_state if run.rank == 0 else None),
                                 optimizer_state=run.engine.optimizer_state(), rng_state=torch.get_rng_state(),
                                 barrier=dist.barrier, gather=all_gather_objects, **common)
    record["stall_s"] = time.perf_counter() - start
    # The checkpoint directory on disk is the one record of checkpoints (see cluster/checkpointing.py).
    ray.train.report(metrics)
    return record


def eval_record(run: WorkerRun) -> dict[str, Any]:
    """The metrics.jsonl record of a validation pass at the current step (all ranks take part)."""
    loss, stderr, batch_losses = evaluate(run.model, run.config, run.rank, run.world_size, run.device,
                                          run.autocast)
    run.engine.end_inference()
    return {"kind": "eval", "step": run.step, "val_loss": loss, "val_loss_stderr": stderr,
            "val_ppl": math.exp(min(loss, 50)), "val_batch_losses": batch_losses}


def train_loop_per_worker(config: WorkerConfig) -> None:
    """Entry point of each Ray Train worker; `config` comes from the driver."""
    run = setup(config)
    start = resume_point(run)
    if start is not None and run.rank == 0:
        print(f"[moe.train] {start}", flush=True)
    tcfg = run.trainer
    logger = (MetricsLogger(run.run_dir, config.logger.wandb, config.name, config.resolved,
                            config.logger.ray_metrics, resume_step=run.step) if run.rank == 0 else NullLogger())
    flops_per_token = training_flops_per_token(run.model.config, config.data.seq_len)
    if run.teacher is not None:  # the teacher's forward pass is work done for every token (tokens/s, MFU)
        flops_per_token += teacher_flops_per_token(run.teacher.config, config.data.seq_len)
    status = {"status": "running"}
    consecutive_bad = 0
    run.model.train()
    last_time = time.perf_counter()
    while run.step < tcfg.max_steps:
        inject_faults(run)
        stats = train_step(run)
        consecutive_bad = 0 if stats.stepped else consecutive_bad + 1
        now = time.perf_counter()
        elapsed, last_time = now - last_time, now
        logger.log(train_record(run, stats, elapsed, flops_per_token))
        if consecutive_bad >= tcfg.max_bad_steps:
            status = {"status": "diverged", "step": run.step,
                      "message": f"{consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                                 f"(trainer.max_bad_steps={tcfg.max_bad_steps}); stopped at step {run.step}. "
                                 f"The last good checkpoint is kept in {run.checkpoint_root}."}
            break
        if stats.stepped and (run.step % tcfg.checkpoint_every == 0 or run.step == tcfg.max_steps):
            logger.log(save_checkpoint(run, {"step": run.step, "loss": stats.lm_loss}))
        if tcfg.eval_every and run.step % tcfg.eval_every == 0 and run.step < tcfg.max_steps:
            logger.log(eval_record(run))
            run.model.train()
        if run.probe is not None and run.step % tcfg.diagnostics_every == 0:
            logger.log(diagnose(run))

    summary = dict(status)
    if status["status"] == "running":
        summary["status"] = "finished"
        record = eval_record(run)
        summary.update({key: record[key] for key in ("val_loss", "val_loss_stderr", "val_ppl")})
        logger.log(record)
    if run.checkpointer is not None:  # the last checkpoint is complete on disk before the run reports its end
        run.checkpointer.close()
    summary.update({"final_step": run.step, "bad_steps": run.bad_steps, "world_size": run.world_size,
                    "flops_per_token": flops_per_token, "params": count_parameters(run.model.config),
                    # the workers' accelerator, for the driver's MFU (a KubeRay head has no GPU of its own)
                    "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None})
    if run.rank == 0:
        (run.run_dir / STATUS_FILE).write_text(json.dumps(summary, indent=2))
    logger.close(summary)


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: WorkerConfig, rank: int, world_size: int, device: torch.device,
             autocast) -> tuple[float, float, list[float]]:
    """Mean validation loss over trainer.eval_batches global batches (all ranks take part), its standard
    error (the standard deviation of the global batches' mean losses over sqrt(batches)), and those means:
    two runs evaluated on the same batches compare batch by batch (benchmarks/train_compare.py)."""
    from data_pipeline.loader import CurriculumLoader

    tcfg = config.trainer
    loader = CurriculumLoader.from_config(config.data, global_batch_size=tcfg.global_batch_size,
                                          rank=rank, world_size=world_size, split="validation",
                                          data_dir=config.data_dir)
    model.eval()
    # The training micro-batch, whose activations the memory plan fits; not the whole per-rank batch (S7).
    micro_batch = tcfg.global_batch_size // world_size // tcfg.grad_accum_steps
    sums_N2 = []  # per batch: summed token loss, tokens (this rank)
    for _, batch in zip(range(tcfg.eval_batches), loader):
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, batch["input_ids"].shape[0], micro_batch):
            rows = slice(start, start + micro_batch)
            with autocast:
                out = model(batch["input_ids"][rows].to(device), doc_ids=batch["doc_ids"][rows].to(device),
                            targets=batch["targets"][rows].to(device),
                            loss_chunk_tokens=tcfg.loss_chunk_tokens or None)
            total += out.loss.double() * batch["input_ids"][rows].numel()
        tokens = float(batch["input_ids"].numel())
        sums_N2.append(torch.stack([total.float(), torch.tensor(tokens, device=device)]))
    totals_N2 = torch.stack(sums_N2) if sums_N2 else torch.zeros(0, 2, device=device)
    if world_size > 1:
        dist.all_reduce(totals_N2)
    totals_N2 = totals_N2.double().cpu()
    loss = float(totals_N2[:, 0].sum() / totals_N2[:, 1].sum().clamp_min(1))
    batch_means = totals_N2[:, 0] / totals_N2[:, 1].clamp_min(1)
    stderr = float(batch_means.std() / math.sqrt(len(batch_means))) if len(batch_means) > 1 else float("nan")
    return loss, stderr, batch_means.tolist()
