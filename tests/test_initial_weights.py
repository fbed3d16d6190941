"""trainer.init_from's reader (cluster/initial_weights.py): the weights of a moe checkpoint, a training
checkpoint or a Hugging Face Mixtral export, as the full state dict of the run's model, and every kind of
mismatch refused by name before a worker starts. The end-to-end run (another engine and layout) is in
tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe import ModelConfig, MoETransformer, save_checkpoint
from moe.checkpoint import SHARDED_WEIGHTS_DIR, WEIGHTS_NAME, model_state_for_saving, write_model_config
from moe.hf import export_hf

from cluster.checkpointing import full_model_writer, save_training_checkpoint
from cluster.initial_weights import check_init_from, config_differences, read_initial_state

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
            router=dict(top_k=2), experts=dict(num_experts=4, hidden_size=16))


def tiny(**overrides) -> ModelConfig:
    fields = {**TINY, **overrides}
    for key in ("router", "experts"):
        fields[key] = {**TINY[key], **overrides.get(key, {})}
    return ModelConfig(**fields)


def trained_looking_model(config: ModelConfig, seed: int = 1) -> MoETransformer:
    """Random weights (not the seeded init of a fresh run) and a non-zero expert bias."""
    torch.manual_seed(seed)
    model = MoETransformer(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(torch.randn_like(tensor))
    return model


def assert_same_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_moe_checkpoint_weights_are_read_whole(tmp_path: Path, tie_embeddings: bool) -> None:
    config = tiny(tie_embeddings=tie_embeddings)
    model = trained_looking_model(config)
    save_checkpoint(model, tmp_path / "ckpt")
    assert check_init_from(str(tmp_path / "ckpt"), config) == (tmp_path / "ckpt").resolve()
    assert_same_state(read_initial_state(tmp_path / "ckpt", config), model_state_for_saving(model))
    # The weights load into a fresh model of the run's config and reproduce the logits.
    fresh = MoETransformer(config)
    fresh.load_state_dict(read_initial_state(tmp_path / "ckpt", config), strict=not tie_embeddings)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def _sharded_writer(state: dict[str, torch.Tensor]):
    """A one-worker run's sharded model files (cluster/sharded_checkpoint.py's layout), written in this process."""
    def write(directory: Path, rank: int, model_config: dict) -> list[str]:
        dcp.save(state, checkpoint_id=str(directory / SHARDED_WEIGHTS_DIR), no_dist=True)
        write_model_config(model_config, directory)
        return [f"{SHARDED_WEIGHTS_DIR}/{p.name}" for p in (directory / SHARDED_WEIGHTS_DIR).iterdir()] + ["config.json"]

    return write


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the sharded files, written in one process
@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_training_checkpoint_is_read_and_its_digest_checked(tmp_path: Path, checkpoint_format: str) -> None:
    config = tiny()
    model = trained_looking_model(config)
    writer = full_model_writer if checkpoint_format == "full" else _sharded_writer
    path = save_training_checkpoint(tmp_path / "checkpoints", 7, 0, write_model=writer(model_state_for_saving(model)),
                                    model_config=config.to_dict(), optimizer_state={}, rng_state=torch.get_rng_state(),
                                    train_state={"step": 7}, barrier=lambda: None, gather=lambda obj: [obj],
                                    keep_last=3)
    check_init_from(str(path), config)
    assert_same_state(read_initial_state(path, config), model_state_for_saving(model))
    weights = path / (WEIGHTS_NAME if checkpoint_format == "full" else f"{SHARDED_WEIGHTS_DIR}/__0_0.distcp")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: the header (or the sharded index) still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"trainer\.init_from: .*{weights.name} does not match .*sha256"):
        check_init_from(str(path), config)


@pytest.mark.parametrize("fused_experts", [False, True])
def test_hugging_face_mixtral_export_is_converted(tmp_path: Path, fused_experts: bool) -> None:
    config = tiny()
    model = trained_looking_model(config)
    export_hf(model, tmp_path / "hf", fused_experts=fused_experts)
    check_init_from(str(tmp_path / "hf"), config)
    state = read_initial_state(tmp_path / "hf", config)
    expected = model_state_for_saving(model)
    for name in expected:
        if name.endswith("router.expert_bias"):
            expected[name] = torch.zeros_like(expected[name])  # Mixtral routes without a selection bias
    assert_same_state(state, expected)


def test_mismatches_are_refused_by_name(tmp_path: Path) -> None:
    config = tiny()
    save_checkpoint(trained_looking_model(config), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"trainer\.init_from: .*shapes \['embed_tokens\.weight \(96, 32\) vs "
                                         r"\(96, 48\)'"):
        check_init_from(str(tmp_path / "ckpt"), tiny(hidden_size=48))
    with pytest.raises(ValueError, match=r"missing \['layers\.2\."):
        check_init_from(str(tmp_path / "ckpt"), tiny(num_layers=3))
    with pytest.raises(ValueError, match=r"unexpected \['layers\.0\.ffn\.experts"):
        check_init_from(str(tmp_path / "ckpt"), tiny(first_k_dense=1))
    export_hf(trained_looking_model(config), tmp_path / "hf")
    with pytest.raises(ValueError,
                       match=r"trainer\.init_from: .*gate\.weight. has shape \(4, 32\), expected \(8, 32\)"):
        check_init_from(str(tmp_path / "hf"), tiny(experts=dict(num_experts=8)))

    with pytest.raises(ValueError, match="is not a directory"):
        check_init_from(str(tmp_path / "nowhere"), config)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_init_from(str(tmp_path / "other"), config)
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither a moe checkpoint config"):
        check_init_from(str(tmp_path / "other"), config)
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        check_init_from(str(tmp_path / "other"), config)


def test_changed_model_settings_are_listed(tmp_path: Path) -> None:
    config = tiny()
    save_checkpoint(trained_looking_model(config), tmp_path / "ckpt")
    assert config_differences(tmp_path / "ckpt", config) == []
    changed = tiny(router=dict(top_k=1, aux_loss_coef=0.05))
    check_init_from(str(tmp_path / "ckpt"), changed)  # the same tensors: allowed
    # dense_hidden_size follows top_k (equal active FLOPs) when not set; the config records the resolved value.
    assert config_differences(tmp_path / "ckpt", changed) == ["dense_hidden_size: 32 -> 16",
                                                              "router.aux_loss_coef: 0.01 -> 0.05",
                                                              "router.top_k: 2 -> 1"]
