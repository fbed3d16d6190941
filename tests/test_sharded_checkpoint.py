"""Sharded checkpoints (cluster/sharded_checkpoint.py) on 4 real gloo processes: written in the background from
one layout, read into others and whole in one process, equal to the weights they were written from."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from moe import MoETransformer
from moe.checkpoint import SHARDED_WEIGHTS_DIR, is_sharded_checkpoint, load_checkpoint, model_state_for_saving, \
    read_weights, weights_sha256

from cluster.checkpointing import TRAIN_STATE, read_train_state, save_training_checkpoint, verify_checkpoint
from cluster.engine import FSDPEngine, NativeEngine
from cluster.expert_parallel import apply_expert_parallel, gather_full_state_dict
from cluster.fsdp import local_part
from cluster.parallel_dims import ParallelDims
from cluster.schema import TrainerConfig
from cluster.sharded_checkpoint import ShardedCheckpointer
from dist_helpers import run_distributed
from test_fsdp import debug_config

WORLD = 4
LAYOUTS = {"native": NativeEngine, "fsdp": FSDPEngine}


def _config():
    # A tied head (left out of the files), a dense first layer, a shared expert: every kind of entry.
    return debug_config(tie_embeddings=True, first_k_dense=1, dense_hidden_size=48,
                        experts=dict(num_experts=4, hidden_size=32, num_shared_experts=1, shared_hidden_size=16))


def reference_state() -> dict[str, torch.Tensor]:
    """The weights every layout holds a part of: seeded, then moved off the initialisation."""
    torch.manual_seed(0)
    model = MoETransformer(_config())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model_state_for_saving(model)


def _layout(engine: str, ep: int, rank: int, seed: int):
    """A model in the given layout, seeded differently from the reference (so a load must change it)."""
    dims = ParallelDims(world_size=WORLD, ep=ep)
    dims.build(rank)
    torch.manual_seed(seed)
    model = MoETransformer(_config())
    apply_expert_parallel(model, dims)
    engine = LAYOUTS[engine](model, dims, TrainerConfig(engine=engine))
    return model, dims, engine


def _assert_holds(model, dims, expected: dict[str, torch.Tensor], what: str) -> None:
    full = gather_full_state_dict(model, dims)
    assert full.keys() == expected.keys(), what
    for name in expected:
        assert torch.equal(full[name], expected[name]), (what, name)


def _train_step(model, engine) -> None:
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens, targets=tokens)
    engine.backward(out.loss + out.aux_loss)
    assert engine.step(1e-2, True)[1]


def _worker(rank: int, world_size: int, root: str) -> None:
    writers = {"fsdp ep=2": ("fsdp", 2), "native ep=2": ("native", 2)}
    readers = {"fsdp ep=2": [("native", 2), ("native", 1), ("fsdp", 1)], "native ep=2": [("fsdp", 4), ("fsdp", 2)]}
    for name, (engine_name, ep) in writers.items():
        model, dims, engine = _layout(engine_name, ep, rank, seed=1)
        engine.load_model_state(reference_state())
        _train_step(model, engine)  # AdamW state to save
        expected = {k: v.clone() for k, v in gather_full_state_dict(model, dims).items()}  # shares storage on the CPU
        optimizer_state = {k: v.clone() for k, v in engine.optimizer_state().items()}
        assert optimizer_state
        checkpointer = ShardedCheckpointer(model, dims, torch.device("cpu"))
        released = threading.Event()

        def write(**kwargs):  # the writer thread waits until the training loop has changed the weights
            released.wait(timeout=60)
            return save_training_checkpoint(**kwargs)

        checkpoint_root = Path(root) / name.replace(" ", "_")
        checkpointer.save(write, engine.optimizer_state(to_cpu=False), checkpoint_root=checkpoint_root, step=3,
                          rank=rank, model_config=model.config.to_dict(), train_state={"step": 3}, keep_last=2)
        with torch.no_grad():  # as the next step would: weights and AdamW state change while the files are written
            for tensor in [*model.parameters(), *engine.optimizer_state(to_cpu=False).values()]:
                local_part(tensor).add_(1.0)
        released.set()
        path = checkpointer.wait()
        checkpointer.close()
        assert path == checkpoint_root / "step_00000003"
        stored = load_file(str(path / f"optimizer_rank{rank}.safetensors"))
        assert stored.keys() == optimizer_state.keys()
        assert all(torch.equal(stored[k], optimizer_state[k]) for k in stored), "the optimizer state at the save"
        if rank == 0:
            save_file(expected, str(checkpoint_root / "expected.safetensors"))
        for reader_engine, reader_ep in readers[name]:
            reader, reader_dims, reader_engine_obj = _layout(reader_engine, reader_ep, rank, seed=2)
            reader_engine_obj.load_sharded_model_state(path / SHARDED_WEIGHTS_DIR)
            _assert_holds(reader, reader_dims, expected, f"{name} read as {reader_engine} ep={reader_ep}")
        dist.barrier()


def test_sharded_checkpoints_are_written_in_the_background_and_read_in_any_layout(tmp_path) -> None:
    """Written from FSDP (experts Shard(1) over dp=2 and Shard(0) over ep=2) and from the native engine (expert
    slices replicated over dp), while a training step changes the weights and AdamW state under the writer;
    read back into other engines and expert-parallel degrees, each equal to the state at the save; the
    checkpoint's files all recorded."""
    run_distributed(WORLD, _worker, str(tmp_path), preload=["test_sharded_checkpoint"])
    for name in ("fsdp_ep=2", "native_ep=2"):
        expected = load_file(str(tmp_path / name / "expected.safetensors"))
        path = tmp_path / name / "step_00000003"
        assert verify_checkpoint(path) is None and is_sharded_checkpoint(path)
        files = read_train_state(path)["files"]
        shards = sorted(f for f in files if f.startswith(f"{SHARDED_WEIGHTS_DIR}/__"))
        assert shards == [f"{SHARDED_WEIGHTS_DIR}/__{r}_0.distcp" for r in range(WORLD)], shards
        assert f"{SHARDED_WEIGHTS_DIR}/.metadata" in files and "optimizer_rank3.safetensors" in files
        state = read_weights(path)  # whole, in this one process
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    # moe.load_checkpoint (serving, export, evaluation) reads the sharded layout as it reads model.safetensors.
    model = load_checkpoint(tmp_path / "native_ep=2" / "step_00000003")
    assert torch.equal(model.lm_head.weight, expected["embed_tokens.weight"])
    shard = tmp_path / "native_ep=2" / "step_00000003" / SHARDED_WEIGHTS_DIR / "__1_0.distcp"
    digest = weights_sha256(shard.parent.parent)
    with shard.open("r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    assert "__1_0.distcp does not match its recorded sha256" in verify_checkpoint(shard.parent.parent)
    assert weights_sha256(shard.parent.parent) != digest


def test_a_sharded_index_is_unpickled_with_metadata_classes_only(tmp_path) -> None:
    """DCP's .metadata is a pickle: a crafted one that would run code is refused, naming the file."""
    (tmp_path / SHARDED_WEIGHTS_DIR).mkdir()
    (tmp_path / "config.json").write_text('{"moe_format_version": 1, "model": {}}')

    import shutil

    class Exploit:  # not `print`: a process where Ray's tqdm_ray ran has replaced builtins.print
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (tmp_path / SHARDED_WEIGHTS_DIR / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata refers to shutil\.rmtree"):
        read_weights(tmp_path)
    assert (tmp_path / "victim").is_dir() and not (tmp_path / TRAIN_STATE).exists()
