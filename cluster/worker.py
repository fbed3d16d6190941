"""The training loop that runs inside each Ray Train worker.

Ray Train has already created the process group (gloo on CPU, NCCL on GPU)
when `train_loop_per_worker` starts. Here: build the model (the same seed on
every rank), apply expert parallelism, stream this rank's share of the
curriculum batches, train, checkpoint, report.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe import ModelConfig, MoETransformer
from moe.model import count_parameters, training_flops_per_token

from cluster.checkpointing import (list_checkpoints, load_training_checkpoint, read_train_state_or_none,
                                  save_training_checkpoint)
from cluster.engine import build_engine
from cluster.expert_parallel import apply_expert_parallel, gather_full_state_dict, load_full_state_dict
from cluster.metrics import MetricsLogger
from cluster.parallel_dims import ParallelDims

STATUS_FILE = "status.json"


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
    lr, warmup, total = cfg["lr"], cfg["warmup_steps"], cfg["max_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * cfg["min_lr_ratio"]
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


def start_checkpoint(checkpoint_root: Path, config: dict[str, Any]) -> Optional[Path]:
    """The checkpoint this worker group starts from.

    The driver chose `config["resume_from"]` before Ray started (verified, and
    newer checkpoints set aside). After a worker failure Ray Train restarts the
    group within the same launch: then the newest checkpoint this launch wrote wins.
    """
    for path in reversed(list_checkpoints(checkpoint_root)):
        state = read_train_state_or_none(path)
        if state is not None and state.get("launch_id") == config["launch_id"]:
            return path
    return Path(config["resume_from"]) if config.get("resume_from") else None


def _all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker; `config` comes from the driver (plain dicts)."""
    import ray.train
    import ray.train.torch

    from data_pipeline.loader import CurriculumLoader

    cfg = config["cfg"]
    tcfg, data_cfg = cfg["trainer"], cfg["data"]
    run_dir = Path(config["run_dir"])
    ckpt_root = run_dir / "checkpoints"
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dims = ParallelDims(world_size=world_size, ep=cfg["parallel"]["ep"])
    dims.build(rank)

    model_config = ModelConfig.from_dict(config["model"])
    torch.manual_seed(tcfg["seed"])  # the same initial weights on every rank
    model = MoETransformer(model_config)
    model.set_activation_checkpointing(tcfg["activation_checkpointing"])
    apply_expert_parallel(model, dims)
    model.to(device)
    engine = build_engine(model, dims, tcfg)

    local_batch = tcfg["global_batch_size"] // world_size
    micro_batch = local_batch // tcfg["grad_accum_steps"]
    loader = CurriculumLoader.from_config(data_cfg, global_batch_size=tcfg["global_batch_size"], rank=rank,
                                          world_size=world_size, data_dir=config["data_dir"])

    resume_from = start_checkpoint(ckpt_root, config)
    step, bad_steps_total, tokens_seen = 0, 0, 0
    if resume_from is not None:
        full_state, optimizer_state, train_state = load_training_checkpoint(resume_from, rank)
        load_full_state_dict(model, full_state, dims)
        engine.load_optimizer_state(optimizer_state)
        loader.load_state_dict(train_state["loader"])
        step, bad_steps_total, tokens_seen = train_state["step"], train_state["bad_steps"], train_state["tokens"]
        if rank == 0:
            print(f"[moe.train] resumed from {resume_from} at step {step}", flush=True)

    logger = None
    if rank == 0:
        logger = MetricsLogger(run_dir, cfg["logger"]["wandb"], cfg["name"], cfg, cfg["logger"]["ray_metrics"],
                               resume_step=step)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tcfg["dtype"] == "bfloat16" else nullcontext())
    counts = count_parameters(model_config)
    flops_per_token = training_flops_per_token(model_config, data_cfg["seq_len"])
    debug = tcfg["debug"]
    consecutive_bad = 0
    status = {"status": "running"}
    model.train()
    last_time = time.perf_counter()

    def checkpoint(step_now: int, metrics: dict[str, Any]) -> None:
        full_state = gather_full_state_dict(model, dims)
        train_state = {"step": step_now, "bad_steps": bad_steps_total, "tokens": tokens_seen,
                       "loader": loader.state_dict(), "world_size": world_size, "launch_id": config["launch_id"]}
        save_training_checkpoint(ckpt_root, step_now, rank, full_model_state=full_state if rank == 0 else None,
                                 model_config=model_config.to_dict(), optimizer_state=engine.optimizer_state(),
                                 train_state=train_state, barrier=dist.barrier, gather=_all_gather_object,
                                 keep_last=tcfg["keep_last"],
                                 tokenizer_file=Path(config["data_dir"]) / "tokenizer.json")
        # Ray Train gets the metrics only: the checkpoint directory on disk is the
        # one record of checkpoints (see cluster/checkpointing.py).
        ray.train.report(metrics)

    while step < tcfg["max_steps"]:
        if debug["kill_rank_at_step"] == step and rank == debug["kill_rank"]:
            marker = run_dir / f".killed_at_{step}"
            if not marker.exists():
                marker.touch()
                print(f"[moe.train] debug: killing rank {rank} at step {step}", flush=True)
                os._exit(1)
        difficulty = loader.pace  # the curriculum pace of the batch about to be drawn
        batch = loader.next_batch()
        lm_loss_sum = torch.zeros((), device=device)
        aux_loss_sum = torch.zeros((), device=device)
        stats = []
        for micro in range(tcfg["grad_accum_steps"]):
            rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
            with autocast:
                out = model(batch["input_ids"][rows].to(device), doc_ids=batch["doc_ids"][rows].to(device),
                            targets=batch["targets"][rows].to(device))
            loss = out.loss + out.aux_loss
            if step in debug["nan_loss_at_steps"]:
                loss = loss * float("nan")
            engine.backward(loss / tcfg["grad_accum_steps"])
            lm_loss_sum += out.loss.detach().float()
            aux_loss_sum += out.aux_loss.detach().float()
            stats.append(out.router_stats)

        # One collective for everything logged: losses, load and drops of every MoE layer.
        num_layers = len(stats[0])
        tokens_LE = torch.stack([torch.stack([s[i]["tokens_per_expert"] for s in stats]).sum(0)
                                 for i in range(num_layers)]) if num_layers else torch.zeros(0)
        dropped_L = torch.stack([torch.stack([s[i]["dropped_fraction"] for s in stats]).mean()
                                 for i in range(num_layers)]) if num_layers else torch.zeros(0)
        flat = torch.cat([torch.stack([lm_loss_sum, aux_loss_sum]).cpu() / tcfg["grad_accum_steps"],
                          tokens_LE.flatten().float().cpu(), dropped_L.float().cpu()]).to(device)
        if world_size > 1:
            dist.all_reduce(flat)
            flat[:2] /= world_size
            flat[2 + tokens_LE.numel():] /= world_size
        lm_loss, aux_loss = flat[0].item(), flat[1].item()
        grad_norm, stepped = engine.step(lr_at(step, tcfg), math.isfinite(lm_loss) and math.isfinite(aux_loss))
        if stepped:
            consecutive_bad = 0
        else:
            bad_steps_total += 1
            consecutive_bad += 1
        step += 1
        step_tokens = tcfg["global_batch_size"] * data_cfg["seq_len"]
        tokens_seen += step_tokens
        now = time.perf_counter()
        elapsed, last_time = now - last_time, now

        if rank == 0:
            tokens_LE_global = flat[2:2 + tokens_LE.numel()].view(num_layers, -1) if num_layers else tokens_LE
            mean_load = tokens_LE_global.mean(-1) if num_layers else tokens_LE_global
            record = {"kind": "train", "step": step, "loss": lm_loss, "aux_loss": aux_loss,
                      "grad_norm": grad_norm, "lr": lr_at(step - 1, tcfg), "tokens": tokens_seen,
                      "tokens_per_s": step_tokens / elapsed, "step_time_s": elapsed, "skipped": not stepped,
                      "bad_steps": bad_steps_total, "difficulty": difficulty,
                      "tokens_per_expert": tokens_LE_global.tolist(),
                      "max_load": tokens_LE_global.max(-1).values.tolist() if num_layers else [],
                      "mean_load": mean_load.tolist(),
                      "max_over_mean_load": (tokens_LE_global.max(-1).values / mean_load.clamp_min(1e-9)).tolist()
                      if num_layers else [],
                      "dropped_fraction": flat[2 + tokens_LE.numel():].tolist(),
                      "flops_per_token": flops_per_token}
            logger.log(record)

        if consecutive_bad >= tcfg["max_bad_steps"]:
            status = {"status": "diverged", "step": step,
                      "message": f"{consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                                 f"(trainer.max_bad_steps={tcfg['max_bad_steps']}); stopped at step {step}. The "
                                 f"last good checkpoint is kept in {ckpt_root}."}
            break
        if stepped and (step % tcfg["checkpoint_every"] == 0 or step == tcfg["max_steps"]):
            checkpoint(step, {"step": step, "loss": lm_loss})
        if tcfg["eval_every"] and step % tcfg["eval_every"] == 0 and step < tcfg["max_steps"]:
            val = evaluate(model, config, rank, world_size, device, autocast)
            if rank == 0:
                logger.log({"kind": "eval", "step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            model.train()

    summary = dict(status)
    if status["status"] == "running":
        summary["status"] = "finished"
        summary["val_loss"] = evaluate(model, config, rank, world_size, device, autocast)
        summary["val_ppl"] = math.exp(min(summary["val_loss"], 50))
        if rank == 0:
            logger.log({"kind": "eval", "step": step, "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"]})
    summary.update({"final_step": step, "bad_steps": bad_steps_total, "world_size": world_size,
                    "flops_per_token": flops_per_token, "params": counts})
    if rank == 0:
        (run_dir / STATUS_FILE).write_text(json.dumps(summary, indent=2))
        logger.close(summary)


@torch.no_grad()
def evaluate(model: torch.nn.Module, config: dict[str, Any], rank: int, world_size: int, device: torch.device,
             autocast) -> float:
    """Mean validation loss over trainer.eval_batches global batches (all ranks take part)."""
    from data_pipeline.loader import CurriculumLoader

    tcfg = config["cfg"]["trainer"]
    loader = CurriculumLoader.from_config(config["cfg"]["data"], global_batch_size=tcfg["global_batch_size"],
                                          rank=rank, world_size=world_size, split="validation",
                                          data_dir=config["data_dir"])
    model.eval()
    total = torch.zeros(2, device=device)
    for _, batch in zip(range(tcfg["eval_batches"]), loader):
        with autocast:
            out = model(batch["input_ids"].to(device), doc_ids=batch["doc_ids"].to(device),
                        targets=batch["targets"].to(device))
        total += torch.stack([out.loss.float() * batch["input_ids"].numel(),
                              torch.tensor(float(batch["input_ids"].numel()), device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()
