"""FSDP2 data parallelism (trainer.engine=fsdp) on real gloo processes against one process.

Every rank builds the same model with the same seed. Rank r trains its FSDP
(and expert-parallel) copy on rows [r*B, (r+1)*B) of each global batch through
`cluster.engine.FSDPEngine`; every rank also trains a single-process reference
on the whole global batch through the native engine (world size 1, itself
checked against a float loop elsewhere), and compares: the loss of every step,
the gradient norm of every parameter group, the full model after AdamW steps,
the expert weight norms, and the checkpoint round trip (the gathered state
into a fresh sharded model, the optimizer state into a fresh engine, then one
more step equal to the uninterrupted run).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from safetensors.torch import save_file
from torch.testing import assert_close

from moe import ModelConfig, MoETransformer
from moe.checkpoint import model_state_for_saving

from cluster.diagnostics import GROUPS, expert_weight_norms
from cluster.engine import FSDPEngine, NativeEngine
from cluster.expert_parallel import apply_expert_parallel, gather_full_state_dict
from cluster.fsdp import reshard
from cluster.parallel_dims import ParallelDims
from cluster.reshard import Layout, reshard_optimizer_state
from cluster.schema import TrainerConfig
from dist_helpers import run_distributed

NUM_EXPERTS, SEQ_LEN, ROWS_PER_RANK, STEPS = 4, 16, 2, 3
ENGINE_CFG = dict(grad_clip=1.0, lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95)  # TrainerConfig fields
VARIANTS = {  # name: model config overrides, micro-batches per step
    "moe": (dict(), 1),
    "tied, shared expert, dense first layer, aux-free bias, 2 micro-batches":
        (dict(tie_embeddings=True, first_k_dense=1, dense_hidden_size=48,
              experts=dict(num_experts=NUM_EXPERTS, hidden_size=32, num_shared_experts=1, shared_hidden_size=16),
              router=dict(top_k=2, bias_update_rate=0.01)), 2),
}


def debug_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=SEQ_LEN,
                router=dict(top_k=2), experts=dict(num_experts=NUM_EXPERTS, hidden_size=32))
    return ModelConfig(**{**base, **overrides})


def _step(engine, model, inputs, targets, micro_batches: int, lr: float) -> tuple[torch.Tensor, float]:
    """One optimizer step on (inputs, targets) split into micro-batches; returns (loss, grad norm)."""
    rows = inputs.shape[0] // micro_batches
    total = torch.zeros(())
    for micro in range(micro_batches):
        part = slice(micro * rows, (micro + 1) * rows)
        out = model(inputs[part], targets=targets[part])
        loss = (out.loss + out.aux_loss) / micro_batches
        engine.backward(loss, sync=micro == micro_batches - 1)
        total += loss.detach()
    norm, stepped = engine.step(lr, True)
    assert stepped
    return total, norm


def _global_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _worker(rank: int, world_size: int, eps: tuple[int, ...]) -> None:
    for ep in eps:
        for variant, (overrides, micro_batches) in VARIANTS.items():
            _compare(rank, world_size, ep, variant, debug_config(**overrides), micro_batches)


def _compare(rank: int, world_size: int, ep: int, variant: str, config: ModelConfig, micro_batches: int) -> None:
    label = f"world {world_size} ep {ep} {variant}"
    dims = ParallelDims(world_size, ep, num_experts=NUM_EXPERTS).build(rank)
    torch.manual_seed(0)
    ref = MoETransformer(config)
    initial = {name: value.clone() for name, value in model_state_for_saving(ref).items()}
    model = apply_expert_parallel(copy.deepcopy(ref), dims)
    engine = FSDPEngine(model, dims, TrainerConfig(**ENGINE_CFG, engine="fsdp"))
    ref_engine = NativeEngine(ref, ParallelDims(1, 1), TrainerConfig(**ENGINE_CFG, engine="native"))
    assert all(isinstance(p, DTensor) for p in model.parameters()), "every parameter should be FSDP-sharded"
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    gen = torch.Generator().manual_seed(3)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 64, (world_size * ROWS_PER_RANK, SEQ_LEN + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    for step in range(STEPS):
        inputs, targets = batch()
        lr = 1e-2 * (step + 1) / STEPS
        loss, norm = _step(engine, model, inputs[rows], targets[rows], micro_batches, lr)
        # The reference sees each rank's rows as its own micro-batches: the mean of the per-rank losses.
        ref_loss = torch.zeros(())
        ref_loss_parts = []
        for r in range(world_size):
            part = slice(r * ROWS_PER_RANK, (r + 1) * ROWS_PER_RANK)
            ref_loss_parts.append((inputs[part], targets[part]))
        ref_norm = _reference_step(ref_engine, ref, ref_loss_parts, micro_batches, lr, ref_loss)
        assert_close(_global_mean(loss), ref_loss, rtol=0, atol=1e-5, msg=lambda m: f"{label} step {step}: {m}")
        if step == 0:  # an evaluation between steps (forward only) changes nothing and leaves nothing gathered
            with torch.no_grad():
                model.eval()
                model(inputs[rows])
                model.train()
            reshard(model)
            assert all(isinstance(p, DTensor) for p in model.parameters()), f"{label}: gathered after evaluation"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"{label} step {step}: grad norm {norm} vs {ref_norm}"
        for group in GROUPS:
            assert engine.last_grad_norms[group] == pytest.approx(ref_engine.last_grad_norms[group], rel=1e-4,
                                                                  abs=1e-7), f"{label} step {step}: {group}"

    full = gather_full_state_dict(model, dims)
    expected = model_state_for_saving(ref)
    assert full.keys() == expected.keys()
    moved = max((value - initial[name]).abs().max().item() for name, value in expected.items())
    assert moved > 100 * 1e-5, f"{label}: parameters moved only {moved}: the comparison would be vacuous"
    for name, value in expected.items():
        assert_close(full[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{label} {name}: {m}")
    writer = gather_full_state_dict(model, dims, only_rank0=True)  # what the checkpoint writer gets
    if rank == 0:
        assert writer.keys() == full.keys() and all(torch.equal(writer[n], full[n]) for n in full), label
    else:
        assert writer == {}, f"{label}: rank {rank} kept a full copy of the model"
    assert_close(expert_weight_norms(model, dims), expert_weight_norms(ref, ParallelDims(1, 1)), rtol=1e-5,
                 atol=1e-6, msg=lambda m: f"{label}: expert weight norms: {m}")

    # Resume: the gathered model and this rank's optimizer state into fresh ones give the same next step.
    optimizer_state = engine.optimizer_state()
    assert not any(isinstance(t, DTensor) for t in optimizer_state.values())
    _check_resharding(rank, world_size, ep, config, model, dims, optimizer_state, ref_engine.optimizer_state(),
                      label)
    torch.manual_seed(123)  # different initial weights, overwritten by the load
    fresh = apply_expert_parallel(MoETransformer(config), dims)
    fresh_engine = FSDPEngine(fresh, dims, TrainerConfig(**ENGINE_CFG, engine="fsdp"))
    fresh_engine.load_model_state(full)
    fresh_engine.load_optimizer_state(optimizer_state)
    inputs, targets = batch()
    loss, _ = _step(engine, model, inputs[rows], targets[rows], micro_batches, 1e-3)
    fresh_loss, _ = _step(fresh_engine, fresh, inputs[rows], targets[rows], micro_batches, 1e-3)
    assert torch.equal(loss, fresh_loss), label
    after, fresh_after = gather_full_state_dict(model, dims), gather_full_state_dict(fresh, dims)
    for name, value in after.items():
        assert torch.equal(fresh_after[name], value), f"{label}: {name} differs after a resumed step"


def _check_resharding(rank: int, world_size: int, ep: int, config: ModelConfig, model, dims: ParallelDims,
                      fsdp_state: dict, single_state: dict, label: str) -> None:
    """cluster/reshard.py both ways: the ranks' FSDP files make the single-process (native, ep=1) state, and
    the single-process file makes each rank's FSDP part (its experts, its chunk), equal to what training left
    there (within the FSDP-vs-one-process tolerance; a permuted or misplaced chunk is off by far more)."""
    shared = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(shared)
    directory = Path(shared[0])
    save_file(fsdp_state, str(directory / f"optimizer_rank{rank}.safetensors"))
    dist.barrier()
    as_single = reshard_optimizer_state(directory, Layout("fsdp", ep, world_size), MoETransformer(config),
                                        ParallelDims(world_size, 1))
    assert as_single.keys() == single_state.keys(), label
    for key, value in single_state.items():
        assert_close(as_single[key], value, rtol=1e-3, atol=1e-9, msg=lambda m: f"{label} to one process {key}: {m}")
    dist.barrier()
    if rank == 0:
        save_file(single_state, str(directory / "optimizer_rank0.safetensors"))
    dist.barrier()
    as_fsdp = reshard_optimizer_state(directory, Layout("native", 1, 1), model, dims)
    assert as_fsdp.keys() == fsdp_state.keys(), label
    for key, value in fsdp_state.items():
        assert_close(as_fsdp[key], value, rtol=1e-3, atol=1e-9, msg=lambda m: f"{label} to rank {rank} {key}: {m}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(directory)


def _reference_step(engine, model, parts, micro_batches: int, lr: float, loss_out: torch.Tensor) -> float:
    """The single-process step: each rank's rows, each split into the same micro-batches, scaled so that the
    loss is the mean over ranks of each rank's mean over its micro-batches."""
    for inputs, targets in parts:
        rows = inputs.shape[0] // micro_batches
        for micro in range(micro_batches):
            part = slice(micro * rows, (micro + 1) * rows)
            out = model(inputs[part], targets=targets[part])
            loss = (out.loss + out.aux_loss) / micro_batches / len(parts)
            engine.backward(loss)
            loss_out += loss.detach()
    norm, stepped = engine.step(lr, True)
    assert stepped
    return norm


@pytest.mark.slow
@pytest.mark.timeout(300)
# `make test` runs 2 processes (ep 1 and 2); the hybrid 4-process layout (dp 2 x ep 2, and ep 4) runs in
# `make test-slow` (tests/test_expert_parallel.py covers dp x ep with the native engine in `make test`).
@pytest.mark.parametrize("world_size,eps", [(2, (1, 2)), pytest.param(4, (2, 4), marks=pytest.mark.extended)])
def test_fsdp_training_matches_single_process(world_size: int, eps: tuple[int, ...]) -> None:
    """Losses, per-group gradient norms and AdamW updates of FSDP (with expert parallelism, including ep = world
    where each expert-data-parallel group is one rank) equal one process within 1e-5; checkpoints round-trip."""
    run_distributed(world_size, _worker, eps, preload=[__name__])


def _bf16_worker(rank: int, world_size: int) -> None:
    dims = ParallelDims(world_size, world_size, num_experts=NUM_EXPERTS).build(rank)
    config = debug_config()
    torch.manual_seed(0)
    ref = MoETransformer(config)
    model = apply_expert_parallel(copy.deepcopy(ref), dims)
    engine = FSDPEngine(model, dims, TrainerConfig(**ENGINE_CFG, engine="fsdp", dtype="bfloat16"))
    # FSDP2 casts a shard to param_dtype before its all-gather: the unsharded weights a forward sees show the
    # dtype that crossed the network.
    gathered: list[torch.dtype] = []
    hooks = [module.register_forward_pre_hook(lambda module, args: gathered.append(module.weight.dtype))
             for module in (model.layers[0].attn.q_proj, model.layers[1].attn.o_proj, model.lm_head)]
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (world_size * ROWS_PER_RANK, SEQ_LEN + 1), generator=gen)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = _step(engine, model, tokens[rows, :-1], tokens[rows, 1:], 1, 1e-2)
    for hook in hooks:
        hook.remove()
    assert gathered == [torch.bfloat16] * 3, gathered  # the parameters travel (and compute) in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the sharded master weights stay float32"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ref(tokens[:, :-1], targets=tokens[:, 1:])
    # bf16 parameters everywhere (norms, router, embeddings) against bf16 autocast matmuls only: bf16's error.
    assert_close(_global_mean(loss), (out.loss + out.aux_loss).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fsdp_gathers_bf16_parameters_under_bf16_training() -> None:
    """Issue 18, S3: with trainer.dtype=bfloat16 the FSDP engine's MixedPrecisionPolicy gathers bf16 parameters
    (half the all-gather bytes) and keeps float32 shards; the loss is the bf16 model's within bf16 error."""
    run_distributed(2, _bf16_worker, preload=[__name__])
