"""Hugging Face Mixtral interop: transformers reproduces our logits and losses, and back.

Every parity check compares against `transformers.MixtralForCausalLM` itself
(float32, eager attention) on a named tiny size. Weights use init_std 0.1 and
random norm gains, so that every tensor (norms included) moves the logits far
more than the 1e-4 tolerance; `test_parity_checks_are_sensitive` proves it for
the expert order and the sliding window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

import moe  # noqa: E402
from data_pipeline.tokenize import train_tokenizer  # noqa: E402
from moe import ModelConfig, MoETransformer  # noqa: E402
from moe import hf as moe_hf  # noqa: E402
from moe.router import switch_load_balancing_loss  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
VOCAB, SEQ = 128, 24

# The named tiny size of these tests: hidden 64, 2 layers, 4 experts, vocab 128.
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64, init_std=0.1,
            router=dict(top_k=2), experts=dict(num_experts=4, hidden_size=32))

CONFIGS = {
    "base": {},
    "gqa": dict(num_kv_heads=2),
    "sliding_window": dict(sliding_window=7),
    "tied": dict(tie_embeddings=True),
    "gqa_window_tied_top1": dict(num_kv_heads=1, sliding_window=5, tie_embeddings=True, rope_theta=10_000.0,
                                 router=dict(top_k=1)),
}


def tiny_config(**overrides) -> ModelConfig:
    fields = {**TINY, **overrides}
    for key in ("router", "experts"):
        fields[key] = {**TINY[key], **overrides.get(key, {})}
    return ModelConfig(**fields)


@torch.no_grad()
def randomize_norms_(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.3 * torch.randn_like(param))


def tiny_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(tiny_config(**overrides))
    randomize_norms_(model)
    return model.eval()


def load_hf(path: Path) -> MixtralForCausalLM:
    model, info = MixtralForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                     output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(ours: MoETransformer, theirs: MixtralForCausalLM) -> float:
    ids = input_ids()
    return (ours(ids).logits - theirs(ids).logits).abs().max().item()


# --- our model -> transformers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_experts", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_with_same_logits(tmp_path, name: str, fused_experts: bool) -> None:
    model = tiny_model(**CONFIGS[name])
    path = moe_hf.export_hf(model, tmp_path / "hf", fused_experts=fused_experts)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    names = set(load_file(str(path / "model.safetensors")))
    expert_key = "mlp.experts.gate_up_proj" if fused_experts else "block_sparse_moe.experts.3.w3.weight"
    assert f"model.layers.1.{expert_key}" in names
    assert ("lm_head.weight" in names) == (not model.config.tie_embeddings)

    theirs = load_hf(path)
    assert theirs.config.num_key_value_heads == model.config.num_kv_heads
    assert theirs.config.sliding_window == model.config.sliding_window
    assert theirs.config.tie_word_embeddings == model.config.tie_embeddings
    if model.config.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert max_logit_diff(model, theirs) < ATOL


def test_parity_checks_are_sensitive(tmp_path) -> None:
    """A wrong expert order or a missing sliding window would fail the 1e-4 checks by far."""
    model = tiny_model(sliding_window=7)
    theirs = load_hf(moe_hf.export_hf(model, tmp_path / "hf"))
    with torch.no_grad():
        swapped = theirs.model.layers[0].mlp.experts.gate_up_proj[[1, 0, 2, 3]].clone()
        theirs.model.layers[0].mlp.experts.gate_up_proj.copy_(swapped)
    assert max_logit_diff(model, theirs) > 100 * ATOL
    full_attention = MoETransformer(tiny_config()).eval()
    full_attention.load_state_dict(model.state_dict())
    assert max_logit_diff(full_attention, load_hf(tmp_path / "hf")) > 100 * ATOL


# --- transformers -> our model ----------------------------------------------------------------------------------


def hf_random_model(**overrides) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.1,
                           rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                           attn_implementation="eager", **overrides)
    model = MixtralForCausalLM(config)
    randomize_norms_(model)
    return model.eval()


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "fused_state_dict"])
def test_transformers_model_imports_with_same_logits(tmp_path, layout: str) -> None:
    theirs = hf_random_model(sliding_window=9, tie_word_embeddings=layout == "sharded")
    path = tmp_path / "hf"
    if layout == "fused_state_dict":  # transformers 5's in-memory names, written without save_pretrained
        path.mkdir()
        theirs.config.to_json_file(path / "config.json")
        state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
    else:
        theirs.save_pretrained(path, max_shard_size="40KB" if layout == "sharded" else "50GB")
    assert (path / "model.safetensors.index.json").is_file() == (layout == "sharded")

    ours = moe_hf.import_hf(path)
    assert ours.config.num_kv_heads == 2 and ours.config.sliding_window == 9 and ours.config.rope_theta == 10_000.0
    assert ours.config.tie_embeddings == (layout == "sharded")
    assert max_logit_diff(ours, theirs) < ATOL


def test_transformers4_style_config_is_read() -> None:
    """transformers 4.x wrote rope_theta at the top level and no head_dim."""
    hf_config = {"model_type": "mixtral", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 36,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "rope_theta": 12345.0, "rope_scaling": None, "sliding_window": None, "hidden_act": "silu"}
    config = moe_hf.from_hf_config(hf_config)
    assert config.rope_theta == 12345.0 and config.head_dim == 16 and config.num_kv_heads == 2
    assert config.experts.backend == "loop", "36 is not a multiple of 8, so grouped_mm cannot run it"


# --- round trips -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_experts", [False, True], ids=["per_expert", "fused"])
def test_export_import_round_trip_is_exact(tmp_path, fused_experts: bool) -> None:
    # Forward-neutral settings Mixtral has no field for travel in config.json's moe_extra_config.
    model = tiny_model(num_kv_heads=2, sliding_window=7, tie_embeddings=True, dense_hidden_size=40,
                       router=dict(aux_loss_coef=0.03, z_loss_coef=1e-3, seq_aux_loss_coef=1e-4, jitter_eps=0.01,
                                   drop_policy="position"),
                       experts=dict(backend="loop"))
    path = moe_hf.export_hf(model, tmp_path / "hf", fused_experts=fused_experts)
    layers = model.config.num_moe_layers
    assert json.loads((path / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(0.03 * layers)
    back = moe_hf.import_hf(path)
    assert back.config == model.config
    theirs, ours = back.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=0, rtol=0, msg=name)
    assert back.lm_head.weight is back.embed_tokens.weight


def test_bfloat16_export_round_trip(tmp_path) -> None:
    model = tiny_model()
    path = moe_hf.export_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(path / "model.safetensors")).values()} == {torch.bfloat16}
    back = moe_hf.import_hf(path, dtype=torch.bfloat16)
    back_params = dict(back.named_parameters())  # router buffers stay float32 by design
    for name, param in model.named_parameters():
        torch.testing.assert_close(back_params[name], param.detach().to(torch.bfloat16), atol=0, rtol=0)


# --- balancing losses against transformers' ---------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_equals_transformers_load_balancing_loss(top_k: int) -> None:
    torch.manual_seed(top_k)
    logits_TE = torch.randn(50, 8) * 2
    topk_ids_TK = torch.topk(logits_TE, top_k, dim=-1).indices
    ours = switch_load_balancing_loss(torch.softmax(logits_TE, dim=-1), topk_ids_TK)
    theirs = load_balancing_loss_func((logits_TE,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_aux_loss_matches_transformers_convention(tmp_path) -> None:
    """One MoE layer: our aux_loss = router_aux_loss_coef * HF aux_loss, and HF's
    loss = our cross entropy + our aux_loss. With several layers we sum the
    per-layer losses (HF pools the statistics over layers) and the export scales
    router_aux_loss_coef by the layers; import restores our coefficient."""
    ids = input_ids()
    targets = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    for num_layers in (1, 2):
        model = tiny_model(num_layers=num_layers, router=dict(aux_loss_coef=0.02))
        theirs = load_hf(moe_hf.export_hf(model, tmp_path / f"hf{num_layers}"))
        assert theirs.config.router_aux_loss_coef == pytest.approx(0.02 * num_layers)
        out = model(ids, targets=targets)
        hf_out = theirs(ids, labels=ids, output_router_logits=True)
        per_layer = [load_balancing_loss_func((logits,), 4, 2) for logits in hf_out.router_logits]
        torch.testing.assert_close(out.aux_loss, 0.02 * torch.stack(per_layer).sum(), atol=1e-7, rtol=1e-5)
        assert moe_hf.from_hf_config(theirs.config.to_dict()).router.aux_loss_coef == 0.02
        if num_layers == 1:
            torch.testing.assert_close(out.aux_loss, 0.02 * hf_out.aux_loss, atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(out.loss + out.aux_loss, hf_out.loss, atol=1e-5, rtol=1e-5)


def test_import_of_a_hub_config_takes_a_per_layer_coefficient() -> None:
    """A Mixtral config without our coefficient (as on the Hub): HF's pooled one spread over the layers."""
    hf_config = moe_hf.to_hf_config(tiny_model(num_layers=4).config)
    hf_config[moe_hf.EXTRA_CONFIG_KEY]["router"].pop("aux_loss_coef")
    hf_config["router_aux_loss_coef"] = 0.02
    assert moe_hf.from_hf_config(hf_config).router.aux_loss_coef == pytest.approx(0.005)


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (dict(router=dict(score_func="sigmoid")), "RouterConfig.score_func"),
    (dict(router=dict(renormalize=False)), "RouterConfig.renormalize"),
    (dict(router=dict(route_scale=2.5)), "RouterConfig.route_scale"),
    (dict(router=dict(capacity_factor=1.25)), "RouterConfig.capacity_factor"),
    (dict(router=dict(bias_update_rate=1e-3)), "RouterConfig.bias_update_rate"),
    (dict(experts=dict(num_shared_experts=1)), "ExpertsConfig.num_shared_experts"),
    (dict(first_k_dense=1), "ModelConfig.first_k_dense"),
])
def test_inexpressible_configs_are_refused(tmp_path, overrides: dict, field: str) -> None:
    model = tiny_model(**overrides)
    with pytest.raises(ValueError, match=field):
        moe_hf.export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_refusal_names_every_field() -> None:
    config = tiny_config(first_k_dense=1, router=dict(score_func="sigmoid", route_scale=2.5))
    with pytest.raises(ValueError) as err:
        moe_hf.check_mixtral_compatible(config)
    for field in ("RouterConfig.score_func", "RouterConfig.route_scale", "ModelConfig.first_k_dense"):
        assert field in str(err.value)


@pytest.mark.parametrize("change, field", [
    (dict(model_type="mistral"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}), "rope_type"),
    (dict(router_jitter_noise=0.1), "router_jitter_noise"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(num_local_experts=3), "block_sparse_moe.gate.weight"),  # shape mismatch names the tensor
])
def test_import_refuses_what_we_cannot_run(tmp_path, change: dict, field: str) -> None:
    path = moe_hf.export_hf(tiny_model(), tmp_path / "hf")
    hf_config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_config, **change}))
    with pytest.raises(ValueError, match=field):
        moe_hf.import_hf(path)


def test_import_names_missing_and_unexpected_tensors(tmp_path) -> None:
    path = moe_hf.export_hf(tiny_model(), tmp_path / "hf")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        moe_hf.import_hf(path)
    state = load_file(str(moe_hf.export_hf(tiny_model(), tmp_path / "hf") / "model.safetensors"))
    save_file({**state, "model.layers.0.mlp.shared_expert.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="shared_expert"):
        moe_hf.import_hf(path)


# --- CLI and dependencies ---------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "moe.hf", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_export_and_import(tmp_path) -> None:
    model = tiny_model(num_kv_heads=2)
    checkpoint = moe.save_checkpoint(model, tmp_path / "ckpt")
    result = run_cli("export", checkpoint, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert max_logit_diff(model, load_hf(tmp_path / "hf")) < ATOL

    theirs = hf_random_model()
    theirs.save_pretrained(tmp_path / "hf_random")
    result = run_cli("import", tmp_path / "hf_random", tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    assert max_logit_diff(moe.load_checkpoint(tmp_path / "imported"), theirs) < ATOL

    moe.save_checkpoint(tiny_model(router=dict(score_func="sigmoid")), tmp_path / "sigmoid")
    result = run_cli("export", tmp_path / "sigmoid", tmp_path / "hf_sigmoid")
    assert result.returncode == 2 and "RouterConfig.score_func" in result.stderr
    assert not (tmp_path / "hf_sigmoid").exists()


def test_moe_hf_does_not_import_transformers() -> None:
    code = "import sys, moe, moe.hf; assert 'transformers' not in sys.modules, 'moe.hf imported transformers'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr


def test_export_replaces_only_a_previous_export_or_an_empty_directory(tmp_path) -> None:
    from moe.checkpoint import ReplaceRefusedError

    path = moe_hf.export_hf(tiny_model(), tmp_path / "hf")
    assert moe_hf.is_hf_export(path)
    moe_hf.export_hf(tiny_model(), path)  # a previous export: replaced
    (tmp_path / "empty").mkdir()
    moe_hf.export_hf(tiny_model(), tmp_path / "empty")
    # A downloaded model (tokenizer beside the weights), an unrelated directory, a file: kept, refused.
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in ("config.json", "model.safetensors"):
        (downloaded / name).write_bytes((path / name).read_bytes())
    (downloaded / "tokenizer.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for target in (downloaded, tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(ReplaceRefusedError, match=f"refusing to replace {target}"):
            moe_hf.export_hf(tiny_model(), target)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # An export with its tokenizer (from a checkpoint's tokenizer.json) is an export: replaced again.
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(train_tokenizer(["the router sends tokens"] * 4, vocab_size=270,
                                         eos_token="<|endoftext|>").to_str())
    with_tokenizer = moe_hf.export_hf(tiny_model(), tmp_path / "hf_tok", tokenizer_file=tokenizer)
    assert moe_hf.is_hf_export(with_tokenizer) and (with_tokenizer / "tokenizer.json").read_text() == \
        tokenizer.read_text()
    moe_hf.export_hf(tiny_model(), with_tokenizer, tokenizer_file=tokenizer)
    checkpoint = moe.save_checkpoint(tiny_model(), tmp_path / "ckpt")
    result = run_cli("export", checkpoint, tmp_path / "notes")
    assert result.returncode == 2 and result.stderr.startswith(f"error: refusing to replace {tmp_path / 'notes'}")
    assert "Traceback" not in result.stderr
