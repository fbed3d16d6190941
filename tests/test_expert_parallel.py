"""Expert parallelism on real gloo processes against the single-process model.

Every rank builds the full model with the same seed, keeps a copy as the
single-process reference and shards the other; both see the same global batch
(rank r takes rows [r*B, (r+1)*B)), so each rank checks its own shard against
the reference without shipping results around. A failed assertion in a child
process fails the test through `torch.multiprocessing.spawn`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch.testing import assert_close

from moe import ModelConfig, MoETransformer, load_checkpoint, update_expert_bias
from moe.checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, model_state_for_saving
from moe.dispatch import AllToAllDispatcher, LocalDispatcher
from moe.layer import MoELayer

from cluster.diagnostics import GROUPS, expert_weight_norms, grad_square_sums
from cluster.expert_parallel import (apply_expert_parallel, expert_bias_all_reduce, gather_full_state_dict,
                                     is_expert_param, load_full_state_dict, reduce_gradients)
from cluster.optim import optimizer_tensors
from cluster.parallel_dims import ParallelDims
from cluster.reshard import Layout, reshard_optimizer_state
from dist_helpers import HostSyncCounter, run_distributed

# Named tiny sizes for tests (never the real ones).
DEBUG_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)
NUM_EXPERTS, SEQ_LEN, ROWS_PER_RANK = 4, 16, 2
NO_BALANCE_LOSS = dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.0, z_loss_coef=0.0)


def debug_config(backend: str = "grouped_mm", shared: int = 0, **router) -> ModelConfig:
    return ModelConfig(**DEBUG_MODEL, router=dict(top_k=2, **router),
                       experts=dict(num_experts=NUM_EXPERTS, hidden_size=32, backend=backend,
                                    num_shared_experts=shared, shared_hidden_size=16))


def _rows(rank: int) -> slice:
    return slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)


def _sharded_ref_grad(ref_grad: torch.Tensor, param: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    return ref_grad[dims.expert_shard(NUM_EXPERTS)] if is_expert_param(param) and dims.ep > 1 else ref_grad


# (a) one MoE layer: outputs and all gradients ------------------------------------------------------------------

LAYER_CASES = [  # backend, dtype, capacity_factor, shared experts
    ("loop", torch.float64, None, 0),
    ("loop", torch.float64, 0.5, 0),
    ("grouped_mm", torch.float32, None, 0),
    ("grouped_mm", torch.float32, 0.5, 0),
    ("grouped_mm", torch.float32, None, 2),
]


def _layer_worker(rank: int, world_size: int, eps: tuple[int, ...]) -> None:
    for ep in eps:
        _compare_layer(rank, world_size, ParallelDims(world_size, ep, num_experts=NUM_EXPERTS).build(rank))


def _compare_layer(rank: int, world_size: int, dims: ParallelDims) -> None:
    ep = dims.ep
    for backend, dtype, capacity_factor, shared in LAYER_CASES:
        torch.manual_seed(0)
        ref = MoELayer(debug_config(backend, shared, capacity_factor=capacity_factor, **NO_BALANCE_LOSS)).to(dtype)
        layer = apply_expert_parallel(copy.deepcopy(ref), dims)
        assert isinstance(layer.dispatcher, AllToAllDispatcher if ep > 1 else LocalDispatcher)
        gen = torch.Generator().manual_seed(1)
        x_global = torch.randn(world_size * ROWS_PER_RANK, SEQ_LEN, 32, generator=gen, dtype=dtype)
        cotangent = torch.randn(x_global.shape, generator=gen, dtype=dtype)

        # Reference: one process, rank by rank (capacity is per local batch), loss = sum over ranks.
        x_ref = x_global.clone().requires_grad_()
        out_ref = torch.cat([ref(x_ref[_rows(r)])[0] for r in range(world_size)])
        (out_ref * cotangent).sum().backward()

        x = x_global[_rows(rank)].clone().requires_grad_()
        events = []
        with _recording_all_to_all(events), _shared_expert_events(layer.shared_experts, events), \
                HostSyncCounter() as syncs:
            out, routing = layer(x)
            if shared and ep > 1:  # the shared experts run while the combine exchange is in flight
                assert events[-3:] == ["start async", "shared experts", "wait"], events
            events.clear()
            (out * cotangent[_rows(rank)]).sum().backward()
        # Issue 18, S1: one device-to-host sync per MoE layer under EP (the split sizes), forward and backward.
        assert syncs.ops == [] and syncs.host_ints == 1, (backend, capacity_factor, syncs.ops, syncs.host_ints)
        if ep > 1:  # and their backward while its gradients travel back; the dispatch exchange reverses last
            expected = ["start async", "shared experts backward", "wait", "start"] if shared else ["start", "start"]
            assert events == expected, events
        reduce_gradients(layer, dims)  # the mean over ranks of the summed loss

        if capacity_factor is not None:
            assert (routing.topk_ids_TK < 0).any(), "the capacity case should drop assignments"
        assert_close(out, out_ref[_rows(rank)])
        assert_close(x.grad, x_ref.grad[_rows(rank)])
        ref_params = dict(ref.named_parameters())
        for name, param in layer.named_parameters():
            expected = _sharded_ref_grad(ref_params[name].grad, param, dims) / world_size
            assert_close(param.grad, expected, msg=lambda m: f"{backend} {dtype} {name}: {m}")
        if shared:  # recomputed in the backward (activation checkpointing): the overlapped exchanges run again
            grads = {name: param.grad.clone() for name, param in layer.named_parameters()}
            layer.zero_grad()
            x_again = x.detach().clone().requires_grad_()
            out_again, _ = torch.utils.checkpoint.checkpoint(layer, x_again, use_reentrant=False)
            (out_again * cotangent[_rows(rank)]).sum().backward()
            reduce_gradients(layer, dims)
            assert_close(x_again.grad, x.grad)
            for name, param in layer.named_parameters():
                assert_close(param.grad, grads[name], msg=lambda m: f"checkpointed {name}: {m}")


class _recording_all_to_all:
    """Logs every all_to_all_single ("start" / "start async") and every wait on an async one."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __enter__(self) -> None:
        self.original = original = dist.all_to_all_single
        events = self.events

        class Work:
            def __init__(self, work) -> None:
                self.work = work

            def wait(self) -> None:
                events.append("wait")
                self.work.wait()

        def recording(*args, async_op: bool = False, **kwargs):
            events.append("start async" if async_op else "start")
            work = original(*args, async_op=async_op, **kwargs)
            return Work(work) if async_op else work

        dist.all_to_all_single = recording

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self.original


@contextlib.contextmanager
def _shared_expert_events(module: Optional[torch.nn.Module], events: list[str]):
    """Logs "shared experts" when their forward ends and "shared experts backward" when their backward does."""
    if module is None:
        yield
        return
    handles = [module.register_forward_hook(lambda *_: events.append("shared experts")),
               module.register_full_backward_hook(lambda *_: events.append("shared experts backward"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size,eps", [(2, (2,)), (4, (4, 2))])
def test_moe_layer_matches_single_process(world_size: int, eps: tuple[int, ...]) -> None:
    """(a) sharded experts + all-to-all = the single-process layer, float64 loop and float32 grouped_mm,
    dropless and with capacity dropping, with shared experts computed during the combine exchange; ep = 2 of 4
    ranks also reduces over the expert-data-parallel group."""
    run_distributed(world_size, _layer_worker, eps, preload=[__name__])


def _dispatch_edge_worker(rank: int, world_size: int) -> None:
    dims = ParallelDims(world_size, world_size, num_experts=NUM_EXPERTS).build(rank)
    # Issue 18, S9: at ep == world the all-to-alls get a communicator of their own, not FSDP's world group.
    assert dims.ep_group is not dist.group.WORLD and dist.get_world_size(dims.ep_group) == world_size
    num_tokens, top_k = 8, 2
    gen = torch.Generator().manual_seed(2)
    random_ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:top_k]
                              for _ in range(world_size * num_tokens)])
    drop = torch.rand(random_ids.shape, generator=gen) < 0.3
    all_on_rank1 = (torch.arange(world_size * num_tokens) < num_tokens).unsqueeze(1)  # rank 0's rows
    cases = {
        "only experts of rank 0": random_ids % 2,  # ep rank 1 receives nothing
        "experts 1 and 3 idle": random_ids % 2 * 2,  # each rank has an idle expert
        "one expert takes all": torch.stack([torch.zeros_like(random_ids[:, 0]), random_ids[:, 1].clamp_min(1)], 1),
        "random drops": torch.where(drop, -1, random_ids),
        "rank 1 drops everything": torch.where(all_on_rank1, random_ids, -1),
    }
    for backend, dtype in (("loop", torch.float64), ("grouped_mm", torch.float32)):
        torch.manual_seed(0)
        ref = MoELayer(debug_config(backend)).to(dtype)
        layer = apply_expert_parallel(copy.deepcopy(ref), dims)
        local = LocalDispatcher(NUM_EXPERTS, dropless=False)
        for case, ids_global in cases.items():
            x_global = torch.randn(world_size * num_tokens, 32, generator=gen, dtype=dtype)
            w_global = torch.rand(ids_global.shape, generator=gen, dtype=dtype) * (ids_global >= 0)
            cotangent = torch.randn(x_global.shape, generator=gen, dtype=dtype)
            for module in (ref, layer):
                module.zero_grad(set_to_none=True)

            x_ref, w_ref = x_global.clone().requires_grad_(), w_global.clone().requires_grad_()
            x_ND, counts, state = local.dispatch(x_ref, ids_global)
            out_ref = local.combine(ref.experts(x_ND, counts), w_ref, state)
            (out_ref * cotangent).sum().backward()

            rows = slice(rank * num_tokens, (rank + 1) * num_tokens)
            x, w = x_global[rows].clone().requires_grad_(), w_global[rows].clone().requires_grad_()
            x_MD, counts_local, state = layer.dispatcher.dispatch(x, ids_global[rows])
            assert counts_local.shape == (NUM_EXPERTS // world_size,)
            out = layer.dispatcher.combine(layer.experts(x_MD, counts_local), w, state)
            (out * cotangent[rows]).sum().backward()

            msg = lambda m: f"{case} {backend}: {m}"  # noqa: E731
            assert_close(counts_local, counts[dims.expert_shard(NUM_EXPERTS)], msg=msg)
            assert_close(out, out_ref[rows], msg=msg)
            assert_close(x.grad, x_ref.grad[rows], msg=msg)
            assert_close(w.grad, w_ref.grad[rows], msg=msg)
            for name, param in layer.experts.named_parameters():  # dp = 1: no reduction needed
                assert_close(param.grad, getattr(ref.experts, name).grad[dims.expert_shard(NUM_EXPERTS)], msg=msg)

    # Issue 18, S2: under bf16 autocast the rows cross the network in bf16 (the experts' GEMMs cast them to it
    # anyway): half the bytes of float32, out and back, forward and backward; the answer is the local layer's.
    torch.manual_seed(0)
    ref = MoELayer(debug_config("grouped_mm"))
    layer = apply_expert_parallel(copy.deepcopy(ref), dims)
    x_global = torch.randn(world_size * 2, SEQ_LEN, 32, generator=gen)
    x = x_global[rank * 2:(rank + 1) * 2].clone().requires_grad_()
    sent: list[tuple[torch.dtype, int]] = []
    original = dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        sent.append((input.dtype, input.numel() * input.element_size()))
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(x)
            out.float().square().sum().backward()
    finally:
        dist.all_to_all_single = original
    rows_sent = [(dtype, size) for dtype, size in sent if dtype != torch.int64]  # the counts exchange aside
    assert [dtype for dtype, _ in rows_sent] == [torch.bfloat16] * 4, sent  # dispatch, combine, and back
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, _ = ref(x_global[rank * 2:(rank + 1) * 2])
    assert_close(out.float(), out_ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_all_to_all_dispatcher_empty_ranks_experts_and_drops() -> None:
    """(a) zero rows to a rank or an expert, a rank that sends nothing, capacity drops (ids -1)."""
    run_distributed(2, _dispatch_edge_worker, preload=[__name__])


# (b) training: losses and parameters after several AdamW steps -------------------------------------------------

TRAIN_STEPS = 3
TRAIN_VARIANTS = {
    # Balance losses off (aux-loss-free bias instead): the reference is one whole-batch step.
    "whole batch": dict(whole_batch=True, router=dict(bias_update_rate=0.01, **NO_BALANCE_LOSS)),
    # Balance losses and capacity are per local batch (as in Megatron): the reference accumulates over the
    # same per-rank micro-batches.
    "per-rank micro-batches": dict(whole_batch=False, router=dict(aux_loss_coef=0.01, seq_aux_loss_coef=0.01,
                                                                  z_loss_coef=0.001, capacity_factor=1.0)),
}


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    # Adam normalises each entry's update, so float32 reduction-order noise in near-zero gradient entries
    # becomes update noise proportional to lr (lr=1e-2 gave one entry 1.1e-5 off after 3 steps); lr=1e-3
    # keeps the parity error below 1e-6 while the weights move by ~3e-3.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def _count_all_reduces(fn) -> int:
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = original
    return len(calls)


def _train_worker(rank: int, world_size: int, eps: tuple[int, ...], checkpoint_dir: str) -> None:
    for ep in eps:
        _train_and_compare(rank, world_size, ep, checkpoint_dir)


def _train_and_compare(rank: int, world_size: int, ep: int, checkpoint_dir: str) -> None:
    dims = ParallelDims(world_size, ep, num_experts=NUM_EXPERTS).build(rank)
    global_batch = world_size * ROWS_PER_RANK
    for variant, spec in TRAIN_VARIANTS.items():
        config = debug_config("grouped_mm", **spec["router"])
        torch.manual_seed(0)
        ref = MoETransformer(config)
        model = apply_expert_parallel(copy.deepcopy(ref), dims)
        initial = {name: value.clone() for name, value in model_state_for_saving(ref).items()}
        opt_ref, opt = _optimizer(ref), _optimizer(model)
        gen = torch.Generator().manual_seed(3)
        dropped = 0.0
        for step in range(TRAIN_STEPS):
            tokens = torch.randint(0, 64, (global_batch, SEQ_LEN + 1), generator=gen)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]

            out = model(inputs[_rows(rank)], targets=targets[_rows(rank)])
            loss = out.loss + out.aux_loss
            loss.backward()
            dropped = max([dropped] + [float(stats["dropped_fraction"]) for stats in out.router_stats])
            num_calls = _count_all_reduces(lambda: reduce_gradients(model, dims))
            assert num_calls == (2 if 1 < ep < world_size else 1), f"{num_calls} all-reduces, expected one per group"
            grad_sq_G = grad_square_sums(model, dims)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            global_loss /= world_size
            opt.step()
            update_expert_bias(model, all_reduce=expert_bias_all_reduce(dims))
            opt.zero_grad(set_to_none=True)

            if spec["whole_batch"]:
                out_ref = ref(inputs, targets=targets)
                ref_loss = out_ref.loss + out_ref.aux_loss
                ref_loss.backward()
            else:
                ref_loss = torch.zeros(())
                for r in range(world_size):
                    out_ref = ref(inputs[_rows(r)], targets=targets[_rows(r)])
                    micro_loss = (out_ref.loss + out_ref.aux_loss) / world_size
                    micro_loss.backward()
                    ref_loss += micro_loss.detach()
            assert_close(grad_sq_G, grad_square_sums(ref, ParallelDims(1, 1)), rtol=1e-4, atol=1e-9,
                         msg=lambda m: f"{variant} step {step}: gradient norms by group {GROUPS}: {m}")
            opt_ref.step()
            update_expert_bias(ref)
            opt_ref.zero_grad(set_to_none=True)
            assert_close(global_loss, ref_loss.detach(), rtol=0, atol=1e-5, msg=lambda m: f"{variant} step {step}: {m}")

        if spec["router"].get("capacity_factor"):
            assert dropped > 0, "the capacity variant should drop assignments"
        full = gather_full_state_dict(model, dims)
        expected = model_state_for_saving(ref)
        assert full.keys() == expected.keys()
        moved = max((value - initial[name]).abs().max().item() for name, value in expected.items())
        assert moved > 100 * 1e-5, f"parameters moved only {moved}: the comparison would be vacuous"
        for name, value in expected.items():
            assert_close(full[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{variant} {name}: {m}")
        assert_close(expert_weight_norms(model, dims), expert_weight_norms(ref, ParallelDims(1, 1)),
                     rtol=1e-5, atol=1e-6, msg=lambda m: f"{variant}: expert weight norms: {m}")
        if spec["router"].get("bias_update_rate"):
            assert any(full[n].abs().sum() > 0 for n in full if n.endswith("expert_bias")), "bias never moved"

        if variant == "whole batch":
            _check_checkpoint_round_trip(rank, dims, model, full, expected, f"{checkpoint_dir}/ep{ep}")
            _check_optimizer_resharding(rank, world_size, dims, model, opt, ref, opt_ref,
                                        Path(checkpoint_dir) / f"ep{ep}_optimizer")


def _check_checkpoint_round_trip(rank: int, dims: ParallelDims, model: MoETransformer,
                                 full: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str) -> None:
    """The gathered state is a moe checkpoint; loading it back into a fresh sharded model restores the shards."""
    if rank == 0:
        import pathlib

        directory = pathlib.Path(path)
        directory.mkdir(parents=True)
        save_file(full, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps({"moe_format_version": FORMAT_VERSION,
                                                         "model": model.config.to_dict()}))
        loaded = model_state_for_saving(load_checkpoint(directory))
        for name, value in expected.items():
            assert_close(loaded[name], value, rtol=0, atol=1e-5)
    torch.manual_seed(123)  # different weights
    fresh = apply_expert_parallel(MoETransformer(model.config), dims)
    load_full_state_dict(fresh, full, dims)
    fresh_state, model_state = fresh.state_dict(), model.state_dict()
    for name, value in model_state.items():
        assert torch.equal(fresh_state[name], value), name


def _check_optimizer_resharding(rank: int, world_size: int, dims: ParallelDims, model: MoETransformer,
                                opt: torch.optim.Optimizer, ref: MoETransformer, opt_ref: torch.optim.Optimizer,
                                directory: Path) -> None:
    """cluster/reshard.py for the native layout: the expert-parallel ranks' AdamW state (each holding its
    experts' slice) rebuilt as one process's, and one process's cut into each rank's slice."""
    state = optimizer_tensors(opt, {p: n for n, p in model.named_parameters()})
    single = optimizer_tensors(opt_ref, {p: n for n, p in ref.named_parameters()})
    if rank == 0:
        directory.mkdir(parents=True)
        (directory / "single").mkdir()
        save_file(single, str(directory / "single" / "optimizer_rank0.safetensors"))
    dist.barrier()
    save_file(state, str(directory / f"optimizer_rank{rank}.safetensors"))
    dist.barrier()
    as_single = reshard_optimizer_state(directory, Layout("native", dims.ep, world_size), ref, ParallelDims(1, 1))
    as_rank = reshard_optimizer_state(directory / "single", Layout("native", 1, 1), model, dims)
    for got, want, what in ((as_single, single, "to one process"), (as_rank, state, f"to rank {rank}")):
        assert got.keys() == want.keys(), what
        for key, value in want.items():
            assert_close(got[key], value, rtol=1e-3, atol=1e-9, msg=lambda m: f"ep {dims.ep} {what} {key}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,eps", [(2, (2, 1)), (4, (2, 4))])
def test_training_matches_single_process(world_size: int, eps: tuple[int, ...], tmp_path) -> None:
    """(b) losses of every step and the parameters after AdamW steps equal one process on the global batch
    (within 1e-5, float32); the gathered state is a loadable checkpoint; one all-reduce per group.
    One spawn per world size runs every ep (process start-up dominates the cost)."""
    run_distributed(world_size, _train_worker, eps, str(tmp_path), preload=[__name__])


# (c) auxiliary-loss-free bias update ---------------------------------------------------------------------------

def _bias_worker(rank: int, world_size: int, ep: int) -> None:
    dims = ParallelDims(world_size, ep, num_experts=NUM_EXPERTS).build(rank)
    torch.manual_seed(0)
    ref = MoETransformer(debug_config(bias_update_rate=0.1))
    model = apply_expert_parallel(copy.deepcopy(ref), dims)
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randint(0, 64, (world_size * ROWS_PER_RANK, SEQ_LEN), generator=gen)
    model.train(), ref.train()
    with torch.no_grad():
        model(inputs[_rows(rank)])
        ref(inputs)
    local_counts = torch.stack([layer.ffn.router.tokens_per_expert.clone() for layer in model.layers])
    counts = update_expert_bias(model, all_reduce=expert_bias_all_reduce(dims))
    ref_counts = update_expert_bias(ref)
    assert not torch.equal(local_counts * world_size, ref_counts), "local counts alone would suffice: weak test"
    assert_close(counts, ref_counts, rtol=0, atol=0)
    for layer, ref_layer in zip(model.layers, ref.layers):
        assert_close(layer.ffn.router.expert_bias, ref_layer.ffn.router.expert_bias, rtol=0, atol=0)
        assert layer.ffn.router.expert_bias.abs().sum() > 0
        assert layer.ffn.router.tokens_per_expert.sum() == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_expert_bias_update_matches_single_process() -> None:
    """(c) counts summed over the world give the single-process bias update."""
    run_distributed(2, _bias_worker, 2, preload=[__name__])


# (d) validation and single-process behaviour -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,key", [
    (dict(world_size=4, ep=3), "parallel.ep"),
    (dict(world_size=4, ep=0), "parallel.ep"),
    (dict(world_size=4, ep=-2), "parallel.ep"),
    (dict(world_size=0, ep=1), "cluster.num_workers"),
    (dict(world_size=4, ep=4, num_experts=6), "model.experts.num_experts"),
])
def test_bad_degrees_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ParallelDims(**kwargs)


def test_parallel_dims_layout_and_expert_divisibility() -> None:
    dims = ParallelDims(world_size=8, ep=4)
    assert dims.dp == 2
    assert dims.ep_ranks(5) == [4, 5, 6, 7]
    assert dims.edp_ranks(5) == [1, 5]
    with pytest.raises(ValueError, match=r"model\.experts\.num_experts"):
        dims.check_num_experts(6)
    with pytest.raises(ValueError, match=r"model\.experts\.num_experts"):
        apply_expert_parallel(MoETransformer(debug_config()), ParallelDims(world_size=3, ep=3))


def test_single_process_marks_experts_for_deepspeed() -> None:
    from deepspeed.moe.utils import is_moe_param

    torch.manual_seed(0)
    model = MoETransformer(debug_config())
    reference = model_state_for_saving(model)
    dims = ParallelDims(world_size=1, ep=1)
    apply_expert_parallel(model, dims)
    experts = {name for name, p in model.named_parameters() if is_moe_param(p)}
    assert experts == {f"layers.{i}.ffn.experts.{w}" for i in range(2) for w in ("w1_EDF", "w2_EFD", "w3_EDF")}
    assert all(p.group_name == "ep_size_1" and p.is_expert for n, p in model.named_parameters() if n in experts)
    assert isinstance(model.layers[0].ffn.dispatcher, LocalDispatcher)
    state = gather_full_state_dict(model, dims)
    assert all(torch.equal(state[n], v) for n, v in reference.items())
    out = model(torch.randint(0, 64, (1, SEQ_LEN)), targets=torch.randint(0, 64, (1, SEQ_LEN)))
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    reduce_gradients(model, dims)  # a no-op on one process
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert expert_bias_all_reduce(dims) is None
