"""safetensors + JSON checkpoints: round trip, no pickle, atomic replace, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import moe
from moe import ModelConfig, MoETransformer
from moe import checkpoint as ckpt


def tiny(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                         router=dict(bias_update_rate=0.01), experts=dict(num_experts=4, hidden_size=32),
                         **overrides)
    return MoETransformer(config)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_reproduces_logits(tmp_path, tie: bool) -> None:
    model = tiny(tie_embeddings=tie)
    with torch.no_grad():
        model.layers[0].ffn.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    path = moe.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = moe.load_checkpoint(path)
    assert loaded.config == model.config
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(loaded.layers[0].ffn.router.expert_bias, model.layers[0].ffn.router.expert_bias)
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))


def test_overwrite_keeps_old_checkpoint_when_save_fails(tmp_path, monkeypatch) -> None:
    model = tiny()
    path = moe.save_checkpoint(model, tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        moe.save_checkpoint(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary directory left behind"


def test_load_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        moe.load_checkpoint(tmp_path)
    path = moe.save_checkpoint(tiny(), tmp_path / "ckpt")
    payload = json.loads((path / "config.json").read_text())
    payload["model"]["num_heads"] = 5
    (path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="num_heads"):
        moe.load_checkpoint(path)
    payload["model"]["num_heads"] = 4
    payload["model"]["experts"]["num_experts"] = 8
    (path / "config.json").write_text(json.dumps(payload))
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        moe.load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        moe.load_checkpoint(path)


def test_load_with_dtype(tmp_path) -> None:
    path = moe.save_checkpoint(tiny(), tmp_path / "ckpt")
    model = moe.load_checkpoint(path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[0].ffn.router.expert_bias.dtype == torch.float32


def test_save_replaces_only_its_own_checkpoint_or_an_empty_directory(tmp_path) -> None:
    path = moe.save_checkpoint(tiny(), tmp_path / "ckpt")
    moe.save_checkpoint(tiny(), path)  # its own: replaced
    (tmp_path / "empty").mkdir()
    moe.save_checkpoint(tiny(), tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    training = tmp_path / "step_00000100"  # a training checkpoint: the model plus the state to resume from
    moe.save_checkpoint(tiny(), training)
    (training / "optimizer_rank0.safetensors").write_bytes(b"state")
    for target, reason in ((tmp_path / "mine", "non-empty directory"), (tmp_path / "file", "existing file"),
                           (training, "non-empty directory")):
        before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
        with pytest.raises(ckpt.ReplaceRefusedError, match=f"refusing to replace {target}: it is an? {reason}"):
            moe.save_checkpoint(tiny(), target)
        assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty", "file", "mine", "step_00000100"]


def test_replace_directory_needs_a_predicate_and_checks_before_moving(tmp_path) -> None:
    target, tmp = tmp_path / "target", tmp_path / "tmp"
    target.mkdir()
    (target / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    with pytest.raises(TypeError):
        ckpt.replace_directory(tmp, target)  # no default: every caller says what it may replace
    with pytest.raises(ckpt.ReplaceRefusedError, match="not a thing of ours"):
        ckpt.replace_directory(tmp, target, replaceable=lambda p: False, kind="a thing of ours")
    assert (target / "a").read_text() == "old" and (tmp / "a").read_text() == "new"
    ckpt.replace_directory(tmp, target, replaceable=lambda p: (p / "a").read_text() == "old", kind="ours")
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_write_directory_atomically_refuses_before_writing(tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    calls = []
    with pytest.raises(ckpt.ReplaceRefusedError):
        ckpt.write_directory_atomically(tmp_path / "taken", calls.append, replaceable=lambda p: False, kind="ours")
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # A symbolic link is followed: the data goes where it points and the link stays.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    written = ckpt.write_directory_atomically(tmp_path / "link", lambda d: (d / "f").write_text("1"),
                                              replaceable=lambda p: False, kind="ours")
    assert written == (tmp_path / "real").resolve() and (tmp_path / "link").is_symlink()
    assert (tmp_path / "link" / "f").read_text() == "1"


def test_replace_refused_error_survives_pickling(tmp_path) -> None:
    import pickle

    err = ckpt.ReplaceRefusedError(tmp_path / "x", "it is an existing file", "data.output")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ckpt.ReplaceRefusedError and str(copy) == str(err)
    assert (copy.target, copy.reason, copy.label) == (err.target, err.reason, err.label)
    assert str(err).startswith(f"refusing to replace data.output={tmp_path / 'x'}: it is an existing file")
