"""Conversion to and from the Hugging Face Mixtral format, without importing transformers.

Shape legend: E experts, D hidden, F expert hidden, V vocabulary.

An exported directory holds `config.json` and `model.safetensors` that
`transformers.MixtralForCausalLM.from_pretrained` loads and that computes the
same logits as the `MoETransformer` it came from. Only configs Mixtral can
express are exported (softmax top-k routing renormalised over the k chosen
experts, no shared experts, no dense layers, no capacity limit, no selection
bias); anything else raises `ValueError` naming the field.

NOTE: the contract is the forward pass. Three things behave differently in
training and are deliberately not mapped:
  1. Settings Mixtral has no place for but that leave the forward unchanged
     (z-loss, sequence-wise balance loss, our router-input jitter, the expert
     backend, ...) travel in the extra config.json key `moe_extra_config`, so
     export -> import restores the exact `ModelConfig`; transformers keeps the
     key as an inert attribute and trains without them.
  2. Mixtral's `router_jitter_noise` scales the input of the router *and* the
     experts, ours only the router's: export writes 0 and import refuses a
     non-zero value, as it does a non-zero `attention_dropout`.
  3. We sum the per-layer balancing losses (Switch, ST-MoE, Megatron-LM); HF
     pools the token fractions and probabilities over layers before
     multiplying, about their mean. Export writes `router_aux_loss_coef` =
     aux_loss_coef * num_moe_layers, so HF training balances as strongly, and
     the exact coefficient in `moe_extra_config`; import of a checkpoint
     without it divides by the layers. For one MoE layer HF's `loss` is the
     cross entropy plus our `aux_loss`.

Expert weights are written in the per-expert layout
`block_sparse_moe.experts.{j}.w1/w2/w3` that the Hub's Mixtral checkpoints,
transformers 4.x and transformers 5's own `save_pretrained` use (transformers
5 fuses them into `mlp.experts.gate_up_proj`/`down_proj` while loading);
`fused_experts=True` writes the fused in-memory layout of transformers 5
instead. Import accepts both, unsharded or sharded (`*.index.json`).

CLI:
    python -m moe.hf export CHECKPOINT OUT_DIR [--dtype bfloat16] [--fused-experts]
    python -m moe.hf import HF_DIR OUT_CHECKPOINT [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from moe.checkpoint import load_checkpoint, save_checkpoint, write_directory_atomically
from moe.config import EXPERT_BACKENDS, ModelConfig
from moe.files import TOKENIZER_NAME
from moe.model import MoETransformer

PathLike = Union[str, os.PathLike]

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"
HF_TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # what AutoTokenizer reads beside tokenizer.json
EXPORTED_BY = "moe.hf"  # marks the tokenizer_config.json of an export, which a later export may replace
EXTRA_CONFIG_KEY = "moe_extra_config"

# ModelConfig fields that Mixtral's config cannot hold but that do not change
# the forward pass (NOTE 1 of the module docstring). Everything else is either
# mapped onto a Mixtral field or must have its Mixtral value (`_INEXPRESSIBLE`).
_EXTRA_MODEL_FIELDS = ("dense_hidden_size",)
_EXTRA_ROUTER_FIELDS = ("aux_loss_coef", "jitter_eps", "seq_aux_loss_coef", "z_loss_coef", "drop_policy")
_EXTRA_EXPERTS_FIELDS = ("backend", "shared_hidden_size")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _inexpressible(config: ModelConfig) -> list[str]:
    """Every setting that makes the forward differ from Mixtral's, as 'Field=value (reason)'."""
    router, experts = config.router, config.experts
    checks = [
        (router.score_func != "softmax", "RouterConfig.score_func", router.score_func,
         "Mixtral scores experts with a softmax"),
        (not router.renormalize, "RouterConfig.renormalize", router.renormalize,
         "Mixtral renormalises the top-k gate weights"),
        (router.route_scale != 1.0, "RouterConfig.route_scale", router.route_scale,
         "Mixtral has no gate scale (needs 1.0)"),
        (router.capacity_factor is not None, "RouterConfig.capacity_factor", router.capacity_factor,
         "Mixtral is dropless (needs None)"),
        (router.bias_update_rate > 0, "RouterConfig.bias_update_rate", router.bias_update_rate,
         "Mixtral has no auxiliary-loss-free selection bias (needs 0)"),
        (experts.num_shared_experts > 0, "ExpertsConfig.num_shared_experts", experts.num_shared_experts,
         "Mixtral has no shared experts (needs 0)"),
        (config.first_k_dense > 0, "ModelConfig.first_k_dense", config.first_k_dense,
         "every Mixtral layer is a MoE layer (needs 0)"),
    ]
    return [f"{name}={value!r} ({reason})" for failed, name, value, reason in checks if failed]


def check_mixtral_compatible(config: ModelConfig) -> None:
    """Raises if Mixtral cannot express `config`'s forward pass.

    Args:
        config: the model config to check.
    Raises:
        ValueError: naming every offending field and the value Mixtral needs.
    """
    problems = _inexpressible(config)
    if problems:
        raise ValueError("the Hugging Face Mixtral format cannot express " + "; ".join(problems))


def to_hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` mapping of transformers' `MixtralConfig` for `config`.

    Args:
        config: a Mixtral-compatible model config.
        dtype: the dtype the weights are stored in (written as `dtype`).
    Returns:
        A JSON-serialisable dict; forward-neutral settings Mixtral lacks are
        under `moe_extra_config`.
    Raises:
        ValueError: `config` is not Mixtral-compatible (see `check_mixtral_compatible`).
    """
    check_mixtral_compatible(config)
    router, experts = config.router, config.experts
    extra: dict[str, Any] = {name: getattr(config, name) for name in _EXTRA_MODEL_FIELDS}
    extra["router"] = {name: getattr(router, name) for name in _EXTRA_ROUTER_FIELDS}
    extra["experts"] = {name: getattr(experts, name) for name in _EXTRA_EXPERTS_FIELDS}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": experts.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "num_local_experts": experts.num_experts,
        "num_experts_per_tok": router.top_k,
        "router_aux_loss_coef": router.aux_loss_coef * max(1, config.num_moe_layers),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        EXTRA_CONFIG_KEY: extra,
    }


def _hf_rope_theta(hf_config: dict[str, Any]) -> float:
    # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling`.
    rope = hf_config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"Mixtral config rope_parameters.rope_type={rope_type!r} is not supported "
                         f"(only plain RoPE, 'default')")
    if hf_config.get("rope_scaling"):
        raise ValueError(f"Mixtral config rope_scaling={hf_config['rope_scaling']!r} is not supported "
                         f"(only plain RoPE)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Mixtral config rope_parameters.partial_rotary_factor="
                         f"{rope['partial_rotary_factor']!r} is not supported (needs 1.0)")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 1_000_000.0)))


def from_hf_config(hf_config: dict[str, Any], backend: Optional[str] = None) -> ModelConfig:
    """Our `ModelConfig` for a Mixtral `config.json` mapping.

    Args:
        hf_config: the parsed `config.json` (transformers 4.x or 5.x style).
        backend: expert backend; defaults to the exported one if recorded,
            else "grouped_mm" where the sizes allow it and "loop" otherwise.
    Returns:
        The validated config.
    Raises:
        ValueError: a non-Mixtral config, or a Mixtral setting we cannot run
            (named: hidden_act, rope scaling, dropout, router jitter).
    """
    model_type = hf_config.get("model_type")
    if model_type != "mixtral":
        raise ValueError(f"config.json model_type={model_type!r}: only 'mixtral' checkpoints can be imported")
    for name, allowed, reason in (("hidden_act", ("silu",), "our experts are SwiGLU"),
                                  ("attention_dropout", (0, 0.0, None), "we have no attention dropout"),
                                  ("router_jitter_noise", (0, 0.0, None),
                                   "Mixtral's jitter also scales the expert input; ours only the router's"),
                                  ("mlp_bias", (False, None), "our projections have no bias"),
                                  ("attention_bias", (False, None), "our projections have no bias")):
        if hf_config.get(name) not in allowed:
            raise ValueError(f"Mixtral config {name}={hf_config[name]!r} is not supported ({reason}); "
                             f"needs one of {list(allowed)}")
    extra = dict(hf_config.get(EXTRA_CONFIG_KEY) or {})
    router = dict(extra.pop("router", {}))
    experts = dict(extra.pop("experts", {}))
    if backend is not None:
        experts["backend"] = backend
    num_layers = hf_config.get("num_hidden_layers", 32)
    router.setdefault("aux_loss_coef", hf_config.get("router_aux_loss_coef", 0.001) / num_layers)
    router.update(top_k=hf_config.get("num_experts_per_tok", 2))
    experts.update(num_experts=hf_config.get("num_local_experts", 8),
                   hidden_size=hf_config.get("intermediate_size", 14336))
    hidden_size = hf_config.get("hidden_size", 4096)
    if "backend" not in experts and (hidden_size % 8 or experts["hidden_size"] % 8):
        experts["backend"] = "loop"  # grouped_mm needs 16-byte aligned strides
    num_heads = hf_config.get("num_attention_heads", 32)
    fields = dict(
        vocab_size=hf_config.get("vocab_size", 32000),
        hidden_size=hidden_size,
        num_layers=hf_config.get("num_hidden_layers", 32),
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim") or None,
        max_seq_len=hf_config.get("max_position_embeddings", 4096 * 32),
        rope_theta=_hf_rope_theta(hf_config),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-5),
        sliding_window=hf_config.get("sliding_window"),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        init_std=hf_config.get("initializer_range", 0.02),
        router=router,
        experts=experts,
    )
    overlap = sorted(set(extra) & set(fields))
    if overlap:
        raise ValueError(f"{EXTRA_CONFIG_KEY} must not set Mixtral-mapped field(s) {overlap}")
    return ModelConfig.from_dict({**fields, **extra})


def to_hf_state_dict(model: MoETransformer, fused_experts: bool = False,
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our weights renamed and reshaped to Mixtral's names.

    Args:
        model: a Mixtral-compatible model.
        fused_experts: write transformers 5's fused `mlp.experts.gate_up_proj`
            (E, 2F, D) and `down_proj` (E, D, F) instead of per-expert
            `block_sparse_moe.experts.{j}.w1/w3` (F, D) and `w2` (D, F).
        dtype: cast the tensors (default: keep the model's dtype).
    Returns:
        Contiguous CPU tensors keyed by Mixtral name; no `lm_head.weight` when
        the embeddings are tied (transformers re-ties it).
    """
    check_mixtral_compatible(model.config)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight,
                                    "model.norm.weight": model.norm.weight}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        out[prefix + "input_layernorm.weight"] = layer.attn_norm.weight
        out[prefix + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{prefix}self_attn.{proj}.weight"] = getattr(layer.attn, proj).weight
        experts = layer.ffn.experts
        # Ours compute x @ w[e]; nn.Linear-style HF weights compute x @ w[e].T.
        w1_EFD, w3_EFD = experts.w1_EDF.transpose(1, 2), experts.w3_EDF.transpose(1, 2)
        w2_EDF = experts.w2_EFD.transpose(1, 2)
        if fused_experts:
            out[prefix + "mlp.gate.weight"] = layer.ffn.router.gate.weight
            out[prefix + "mlp.experts.gate_up_proj"] = torch.cat((w1_EFD, w3_EFD), dim=1)
            out[prefix + "mlp.experts.down_proj"] = w2_EDF
        else:
            out[prefix + "block_sparse_moe.gate.weight"] = layer.ffn.router.gate.weight
            for j in range(experts.num_experts):
                out[f"{prefix}block_sparse_moe.experts.{j}.w1.weight"] = w1_EFD[j]
                out[f"{prefix}block_sparse_moe.experts.{j}.w3.weight"] = w3_EFD[j]
                out[f"{prefix}block_sparse_moe.experts.{j}.w2.weight"] = w2_EDF[j]
    return {name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous() for name, t in out.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Mixtral weights (fused or per-expert layout) renamed to our state-dict names.

    Args:
        hf_state: tensors keyed by Mixtral name.
        config: our config for them (see `from_hf_config`).
    Returns:
        Our persistent state dict except the router's `expert_bias` (Mixtral
        has none) and, when tied, `lm_head.weight`.
    Raises:
        ValueError: missing, unexpected or misshapen tensors, by name.
    """
    # Rename as transformers' own conversion does; rotary caches of old exports carry no weights.
    file_names = {name.replace(".block_sparse_moe.", ".mlp."): name for name in hf_state
                  if not name.endswith("rotary_emb.inv_freq")}
    state = {name: hf_state[file_name] for name, file_name in file_names.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}

    def take(hf_name: str, our_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if hf_name not in state:
            raise ValueError(f"Mixtral checkpoint lacks tensor {hf_name!r} (or its block_sparse_moe spelling)")
        tensor = state.pop(hf_name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"Mixtral tensor {file_names[hf_name]!r} has shape {tuple(tensor.shape)}, expected "
                             f"{shape} from the config")
        if our_name:
            out[our_name] = tensor
        return tensor

    d, v, hd = config.hidden_size, config.vocab_size, config.head_dim
    e, f = config.experts.num_experts, config.experts.hidden_size
    take("model.embed_tokens.weight", "embed_tokens.weight", (v, d))
    take("model.norm.weight", "norm.weight", (d,))
    if not config.tie_embeddings:
        take("lm_head.weight", "lm_head.weight", (v, d))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        take(hf + "input_layernorm.weight", ours + "attn_norm.weight", (d,))
        take(hf + "post_attention_layernorm.weight", ours + "ffn_norm.weight", (d,))
        for proj, rows in (("q_proj", config.num_heads * hd), ("k_proj", config.num_kv_heads * hd),
                           ("v_proj", config.num_kv_heads * hd)):
            take(f"{hf}self_attn.{proj}.weight", f"{ours}attn.{proj}.weight", (rows, d))
        take(hf + "self_attn.o_proj.weight", ours + "attn.o_proj.weight", (d, config.num_heads * hd))
        take(hf + "mlp.gate.weight", ours + "ffn.router.gate.weight", (e, d))
        if hf + "mlp.experts.gate_up_proj" in state:
            gate_up_E2FD = take(hf + "mlp.experts.gate_up_proj", "", (e, 2 * f, d))
            w1_EFD, w3_EFD = gate_up_E2FD[:, :f], gate_up_E2FD[:, f:]
            w2_EDF = take(hf + "mlp.experts.down_proj", "", (e, d, f))
        else:
            w1_EFD = torch.stack([take(f"{hf}mlp.experts.{j}.w1.weight", "", (f, d)) for j in range(e)])
            w3_EFD = torch.stack([take(f"{hf}mlp.experts.{j}.w3.weight", "", (f, d)) for j in range(e)])
            w2_EDF = torch.stack([take(f"{hf}mlp.experts.{j}.w2.weight", "", (d, f)) for j in range(e)])
        out[ours + "ffn.experts.w1_EDF"] = w1_EFD.transpose(1, 2).contiguous()
        out[ours + "ffn.experts.w3_EDF"] = w3_EFD.transpose(1, 2).contiguous()
        out[ours + "ffn.experts.w2_EFD"] = w2_EDF.transpose(1, 2).contiguous()
    if state:
        unexpected = sorted(file_names[name] for name in state)
        raise ValueError(f"Mixtral checkpoint has tensors the config does not explain: {unexpected[:5]}")
    return out


def export_hf(model: MoETransformer, out_dir: PathLike, dtype: Optional[torch.dtype] = None,
              fused_experts: bool = False, tokenizer_file: Optional[PathLike] = None,
              eos_token: str = "<|endoftext|>") -> Path:
    """Writes `model` as a Hugging Face Mixtral directory (replacing it atomically).

    Args:
        model: a Mixtral-compatible model.
        out_dir: directory for `config.json` and `model.safetensors`; if it
            exists it must be empty or a previous export (`is_hf_export`).
        dtype: dtype to store the weights in (default: the model's).
        fused_experts: see `to_hf_state_dict`.
        tokenizer_file: the model's tokenizer.json (a checkpoint carries one): copied with a
            tokenizer_config.json, so that `AutoTokenizer.from_pretrained(out_dir)` loads it.
        eos_token: the tokenizer's end-of-sequence token (moe.generate.EOS_TOKEN).
    Returns:
        The directory, loadable with `MixtralForCausalLM.from_pretrained`.
    Raises:
        ValueError: the config is not Mixtral-compatible, naming the field.
        ReplaceRefusedError: `out_dir` is a file or holds something else.
    """
    state = to_hf_state_dict(model, fused_experts=fused_experts, dtype=dtype)
    hf_config = to_hf_config(model.config, dtype or model.embed_tokens.weight.dtype)

    tokenizer = Path(tokenizer_file).read_text() if tokenizer_file is not None else None
    if tokenizer is not None:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_str(tokenizer).token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer_file: {tokenizer_file} has no EOS token {eos_token!r}")
        hf_config.update(eos_token_id=eos_id, bos_token_id=eos_id)

    def write(directory: Path) -> None:
        save_file(state, str(directory / HF_WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / HF_CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:  # no BOS is added: training packs documents separated by EOS only
            (directory / TOKENIZER_NAME).write_text(tokenizer)
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
                                "model_max_length": model.config.max_seq_len, "add_bos_token": False,
                                "clean_up_tokenization_spaces": False, "exported_by": EXPORTED_BY}
            (directory / HF_TOKENIZER_CONFIG_NAME).write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    return write_directory_atomically(Path(out_dir), write, replaceable=is_hf_export,
                                      kind=f"a Hugging Face export ({HF_CONFIG_NAME}, *.safetensors and its "
                                           f"tokenizer files only)")


def is_hf_export(path: Path) -> bool:
    """Whether `path` looks like a directory `export_hf` wrote: a JSON config.json, safetensors and perhaps the
    tokenizer files it writes, nothing else.

    A model directory with anything more (a README, a training checkpoint's
    state) is not ours to replace.
    """
    names = {p.name for p in path.iterdir()}
    weights = {n for n in names if n.endswith(".safetensors")}
    ours = {HF_CONFIG_NAME, HF_INDEX_NAME}
    if names & {TOKENIZER_NAME, HF_TOKENIZER_CONFIG_NAME}:  # the tokenizer files export_hf writes, marked so
        ours |= {TOKENIZER_NAME, HF_TOKENIZER_CONFIG_NAME}
        try:
            marked = json.loads((path / HF_TOKENIZER_CONFIG_NAME).read_text()).get("exported_by") == EXPORTED_BY
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            marked = False
        if not marked:
            return False
    if HF_CONFIG_NAME not in names or not weights or names - weights - ours:
        return False
    try:
        return isinstance(json.loads((path / HF_CONFIG_NAME).read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def hf_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a Mixtral directory: `model.safetensors`, or the shards its index names."""
    if (hf_dir / HF_WEIGHTS_NAME).is_file():
        return [hf_dir / HF_WEIGHTS_NAME]
    if (hf_dir / HF_INDEX_NAME).is_file():
        weight_map = json.loads((hf_dir / HF_INDEX_NAME).read_text())["weight_map"]
        return [hf_dir / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no {HF_WEIGHTS_NAME} or {HF_INDEX_NAME} in {hf_dir} (only safetensors "
                            f"checkpoints are read, never pickled .bin files)")


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in hf_weight_files(hf_dir):
        state.update(load_file(str(file), device="cpu"))
    return state


def import_hf(hf_dir: PathLike, dtype: Optional[torch.dtype] = None,
              backend: Optional[str] = None) -> MoETransformer:
    """Builds a `MoETransformer` from a Hugging Face Mixtral directory.

    Args:
        hf_dir: holds `config.json` and `model.safetensors` (or a sharded
            `model.safetensors.index.json`), e.g. from `save_pretrained`.
        dtype: cast the parameters (default: float32, the model's own).
        backend: expert backend, see `from_hf_config`.
    Returns:
        The model in eval mode, on the CPU.
    Raises:
        FileNotFoundError: missing files. ValueError: an unsupported config
            field or mismatching tensors, by name.
    """
    hf_dir = Path(hf_dir)
    config_file = hf_dir / HF_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory: {config_file} is missing")
    config = from_hf_config(json.loads(config_file.read_text()), backend=backend)
    state = from_hf_state_dict(_read_hf_weights(hf_dir), config)
    model = MoETransformer(config)
    for name, tensor in model.state_dict().items():
        if name.endswith("router.expert_bias"):
            state[name] = tensor  # zeros: Mixtral routes without a selection bias
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()


def _parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else _DTYPES[name]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: `export CHECKPOINT OUT_DIR` or `import HF_DIR OUT_CHECKPOINT`."""
    parser = argparse.ArgumentParser(prog="python -m moe.hf", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="our checkpoint -> Hugging Face Mixtral directory")
    export.add_argument("checkpoint", help="directory written by moe.save_checkpoint")
    export.add_argument("out_dir", help="Hugging Face directory to write")
    export.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="storage dtype (default: as saved)")
    export.add_argument("--fused-experts", action="store_true",
                        help="write transformers 5's fused expert tensors instead of per-expert w1/w2/w3")
    imp = commands.add_parser("import", help="Hugging Face Mixtral directory -> our checkpoint")
    imp.add_argument("hf_dir", help="directory with config.json and safetensors weights")
    imp.add_argument("out_checkpoint", help="checkpoint directory to write (moe.load_checkpoint reads it)")
    imp.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="parameter dtype (default: float32)")
    imp.add_argument("--backend", choices=list(EXPERT_BACKENDS), default=None, help="expert backend")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            model = load_checkpoint(args.checkpoint)
            tokenizer = Path(args.checkpoint) / TOKENIZER_NAME
            path = export_hf(model, args.out_dir, dtype=_parse_dtype(args.dtype), fused_experts=args.fused_experts,
                             tokenizer_file=tokenizer if tokenizer.is_file() else None)
        else:
            model = import_hf(args.hf_dir, dtype=_parse_dtype(args.dtype), backend=args.backend)
            path = save_checkpoint(model, args.out_checkpoint)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
