"""`python -m cascade.calibrate small=CKPT large=CKPT`: fit and evaluate the cascade's difficulty router.

    python -m cascade.calibrate small=runs/mixtral_tiny/checkpoints/step_00000300 \\
                            large=runs/mixtral_base/checkpoints/step_00000500 [out=DIR] [data=DIR] \\
                            [num_queries=2048] [prompt_tokens=32] [continuation_tokens=16] [margin=X] \\
                            [target_large_fraction=0.3] [holdout=0.3] [posthoc_queries=64] [l2=0.01] \\
                            [batch_size=8] [seed=0] [metric=loglik|next_token] [device=cpu|cuda]

With an external large tier (`tiers.large.endpoint` of moe.serve), the large
tier's labels come from that endpoint instead of a checkpoint:

    python -m cascade.calibrate small=CKPT large_endpoint=http://HOST:PORT/v1 large_model=NAME \\
                            [large_api_key_env=VAR] [large_timeout_s=60] ...

Writes out/router.json (`moe.difficulty.DifficultyRouter`, with per-fraction
thresholds for `cascade@0.2` style requests and the post-hoc confidence
threshold) and out/calibration_report.json, and prints a table.

NOTE: the calibration set and its labels.
1. Queries: calibration documents (the split of `data.calibration_fraction`,
   which neither training nor validation reads) of the prepared data the small
   model was trained on (`data=DIR`, or `data.output` of the run's config.yaml when the
   checkpoint is RUN/checkpoints/step_N). A query is the first K tokens of a
   document, K drawn per query from [prompt_tokens // 2, prompt_tokens],
   followed by its true continuation of `continuation_tokens` (M) tokens.
   A split of few long documents would give few queries, so a
   document is cut into consecutive windows of K + M tokens, each a query;
   documents take turns (every document's beginning first, then every
   second window, ...) until `num_queries`.
2. Quality of a tier on a query: the mean NLL of the true continuation under
   that model, teacher-forced (lower is better). It measures how well the
   model would answer without sampling noise. In nats per token for two
   checkpoints; in nats per character with `large_endpoint`, whose tokens are
   not the cascade's (`cascade.endpoint`, NOTE 3). With `metric=next_token`
   the quality is binary instead: the error of the tier's greedy next token
   (0 when it is the continuation's first token, else 1; checkpoints only),
   the metric on which the routers separate the tiers best
   (docs/results/cascade_tiny_base.md).
3. Label: 1 when nll_small - nll_large > margin (the large model's answer is
   better by more than `margin` nats per token, or per character). The default margin is the
   median gain of the fitted queries, so half the labels are 1: a fixed
   margin below a large tier's typical gain labels nearly every query 1 and
   leaves the router nothing to separate.
4. Routers are fit on the queries of (1 - holdout) of the documents; the
   report evaluates them on the other documents' queries. Two candidates:
   `logistic` (logistic regression on the small model's prompt signals) and
   `probe` (`moe.difficulty.fit_probe`: ridge of the gain on the signals and
   the small model's pooled prefill hidden states, layers and penalty chosen
   by cross-validation over the fit documents, Platt-scaled). `router=auto`
   writes the one with the higher held-out APGR (`routing_apgr`).
   Report thresholds for a target fraction are quantiles of the held-out
   scores themselves, so each row routes exactly that fraction and compares
   rankings (routed vs random vs oracle at the same large-call fraction).
   router.json's thresholds are quantiles over all calibration queries.
5. Post-hoc mode: the small model answers greedily (max_tokens = M) on up to
   `posthoc_queries` held-out queries; confidence = `Completion.mean_confidence`;
   the least confident fraction is escalated to the large model. It also
   answers up to `deferral_queries` fit queries, on which the token-level
   deferral rule (`moe.difficulty.DeferralRule`: quantiles of the answer's
   per-token NLL, Gupta et al. 2024) is fitted; router.json carries it, and
   `cascade-posthoc` then escalates on it instead of the mean confidence.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from moe.checkpoint import load_checkpoint, run_config_of
from moe.difficulty import (POOLINGS, SIGNAL_NAMES, DeferralRule, DifficultyRouter, HiddenFeatures,
                            confidence_threshold_for_escalation, fit_probe, prompt_signals, right_pad, routing_apgr,
                            threshold_for_large_fraction)
from moe.files import TOKENIZER_NAME, file_sha256
from moe.model import MoETransformer

from cascade.cli import check_positive_ints, parse_key_values, run, write_json

USAGE = ("usage: python -m cascade.calibrate small=CKPT (large=CKPT | large_endpoint=URL large_model=NAME "
         "[large_api_key_env=VAR] [large_timeout_s=S]) [out=DIR] [data=DIR] [num_queries=N] "
         "[prompt_tokens=K] [continuation_tokens=M] [margin=X] [target_large_fraction=F] [holdout=F] "
         "[posthoc_queries=N] [deferral_queries=N] [router=auto|logistic|probe] [l2=X] [batch_size=N] [seed=N] "
         "[metric=loglik|next_token] [device=D]")
METRICS = ("loglik", "next_token")
REPORT_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TABLE_FRACTIONS = tuple(i / 100 for i in range(101))  # router.json's fraction -> threshold grid
MIN_QUERIES = 10
ROUTER_KINDS = ("auto", "logistic", "probe")

PathLike = Union[str, os.PathLike]

# key: (type, default); None as default means optional without a value.
OPTIONS: dict[str, tuple[type, Any]] = {
    "small": (str, None), "large": (str, None), "out": (str, None), "data": (str, None),
    "num_queries": (int, 2048), "prompt_tokens": (int, 32), "continuation_tokens": (int, 16),
    "margin": (float, None), "target_large_fraction": (float, 0.3), "holdout": (float, 0.3),
    "posthoc_queries": (int, 64), "deferral_queries": (int, 1024), "router": (str, "auto"), "l2": (float, 1e-2),
    "batch_size": (int, 8), "seed": (int, 0),
    "device": (str, None),
    "large_endpoint": (str, None), "large_model": (str, None), "large_api_key_env": (str, None),
    "large_timeout_s": (float, 60.0), "metric": (str, "loglik"),
}


REQUIRED = {"small": "CKPT"}  # and one of large=CKPT / large_endpoint=URL (checked by `calibrate`)


def parse_args(argv: list[str]) -> dict[str, Any]:
    """`key=value` arguments to typed values, defaults filled in; raises ValueError naming the key."""
    return parse_key_values(argv, OPTIONS, REQUIRED, USAGE)


# ---- inputs ------------------------------------------------------------------------------

def check_tokenizers(small: Path, large: Optional[Path]) -> str:
    """Both checkpoints (or the small one alone) carry the same tokenizer.json; returns its sha256.

    Raises:
        FileNotFoundError: a checkpoint without tokenizer.json.
        ValueError: the files differ (the message names both).
    """
    hashes = []
    for key, checkpoint in (("small", small), ("large", large)):
        if checkpoint is None:
            continue
        path = checkpoint / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} is missing (checkpoints of moe.train carry their data's "
                                    f"tokenizer)")
        hashes.append(file_sha256(path))
    if len(hashes) == 2 and hashes[0] != hashes[1]:
        raise ValueError(f"small/large: the tokenizers differ: {small / TOKENIZER_NAME} (sha256 {hashes[0][:12]}...) "
                         f"and {large / TOKENIZER_NAME} (sha256 {hashes[1][:12]}...); a cascade needs two models "
                         f"trained with the same tokenizer")
    return hashes[0]


def check_pair_and_data(small: Path, large: Optional[Path], data: Optional[PathLike]) -> tuple[str, Path]:
    """The pair shares one tokenizer and `data` (default the small run's data) was tokenized with it.

    Returns:
        (the tokenizer's sha256, the prepared data directory).
    Raises:
        ValueError / FileNotFoundError: naming the key (`small/large`, `data`) and the files.
    """
    tokenizer_sha256 = check_tokenizers(small, large)
    data_dir = data_dir_of(small, None if data is None else str(data))
    data_tokenizer = data_dir / TOKENIZER_NAME
    if not data_tokenizer.is_file() or file_sha256(data_tokenizer) != tokenizer_sha256:
        raise ValueError(f"data: {data_tokenizer} is missing or differs from {small / TOKENIZER_NAME}: the "
                         f"queries must be tokenized like the models' training data")
    return tokenizer_sha256, data_dir


def data_dir_of(checkpoint: Path, data: Optional[str]) -> Path:
    """The prepared directory: `data`, else `data.output` of the training run's config.yaml."""
    if data is not None:
        return Path(data)
    run_cfg = run_config_of(checkpoint) or {}
    output = (run_cfg.get("data") or {}).get("output")
    if not output:
        raise ValueError(f"data: {checkpoint} is not inside a training run directory with a config.yaml "
                         f"(RUN/checkpoints/step_N); pass data=DIR, the prepared data it was trained on")
    return Path(output)


def read_split_documents(data_dir: Path, split: str, limit: int, min_tokens: int) -> list[list[int]]:
    """Up to `limit` documents of at least `min_tokens` tokens of one split, in manifest order.

    Raises:
        ValueError: the split is empty (the message names its fraction key).
    """
    from data_pipeline.loader import open_split_shards
    from data_pipeline.manifest import read_manifest

    manifest = read_manifest(data_dir)
    shards, _ = open_split_shards(data_dir, manifest, split, on_corrupt="error")
    documents: list[list[int]] = []
    for shard in shards:
        for index in range(len(shard.entry["record_batches"])):
            for tokens in shard.read_batch(index).column("tokens").to_pylist():
                if len(tokens) >= min_tokens:
                    documents.append(tokens)
                    if len(documents) == limit:
                        return documents
    return documents


def make_queries(documents: list[list[int]], prompt_tokens: int, continuation_tokens: int, seed: int,
                 num_queries: int) -> list[tuple[list[int], list[int]]]:
    """(query, continuation) pairs: windows of K + M tokens of the documents, taken in turns (NOTE 1)."""
    return [pair for pair, _ in query_windows(documents, prompt_tokens, continuation_tokens, seed, num_queries)]


def query_windows(documents: list[list[int]], prompt_tokens: int, continuation_tokens: int, seed: int,
                  num_queries: int) -> list[tuple[tuple[list[int], list[int]], int]]:
    """`make_queries`'s pairs, each with the index of the document it was cut from."""
    rng = random.Random(seed)
    windows: list[list[tuple[tuple[list[int], list[int]], int]]] = []
    for index, tokens in enumerate(documents):
        pairs, start = [], 0
        while True:
            k = rng.randint(max(1, prompt_tokens // 2), prompt_tokens)
            k = min(k, len(tokens) - start - continuation_tokens)
            if k < 1 or (pairs and k < max(1, prompt_tokens // 2)):  # a short tail window only if it is the first
                break
            pairs.append(((tokens[start:start + k], tokens[start + k:start + k + continuation_tokens]), index))
            start += k + continuation_tokens
        windows.append(pairs)
    queries = []
    for turn in range(max((len(w) for w in windows), default=0)):
        queries += [pairs[turn] for pairs in windows if turn < len(pairs)]
    return queries[:num_queries]


@torch.no_grad()
def continuation_nll(model: MoETransformer, pairs: list[tuple[list[int], list[int]]],
                     batch_size: int, reduction: str = "mean") -> torch.Tensor:
    """NLL of each continuation given its query, teacher-forced; (N,) float64.

    reduction: `mean` (nats/token) or `sum` (nats over the continuation).
    """
    device = model.embed_tokens.weight.device
    out = torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = [query + continuation[:-1] for query, continuation in chunk]
        logits = model(right_pad(inputs, device), ignore_capacity=True).logits
        for row, (query, continuation) in enumerate(chunk):
            positions = slice(len(query) - 1, len(query) - 1 + len(continuation))
            logp = torch.log_softmax(logits[row, positions].to(torch.float64), dim=-1)
            targets = torch.tensor(continuation, device=device).unsqueeze(1)
            nll = -logp.gather(1, targets)
            out[start + row] = nll.sum() if reduction == "sum" else nll.mean()
    return out


@torch.no_grad()
def next_token_correct(model: MoETransformer, pairs: list[tuple[list[int], list[int]]],
                       batch_size: int) -> torch.Tensor:
    """1.0 where the model's likeliest next token after the query is the continuation's first token; (N,) float64.

    The greedy answer's first token, read from one prefill of the query: a
    binary outcome per query (`cascade.evaluate` metric `next_token`).
    """
    device = model.embed_tokens.weight.device
    out = torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        logits = model(right_pad([query for query, _ in chunk], device), ignore_capacity=True).logits
        for row, (query, continuation) in enumerate(chunk):
            out[start + row] = float(int(logits[row, len(query) - 1].argmax()) == continuation[0])
    return out


# ---- evaluation --------------------------------------------------------------------------

def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    scores, labels = scores.to(torch.float64), labels.to(torch.bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    greater = (scores[labels].unsqueeze(1) > scores[~labels].unsqueeze(0)).sum()
    ties = (scores[labels].unsqueeze(1) == scores[~labels].unsqueeze(0)).sum()
    return float((greater + 0.5 * ties) / (positives * negatives))


def _gap_recovered(all_small: float, all_large: float, routed: float) -> Optional[float]:
    gap = all_small - all_large
    return None if abs(gap) < 1e-12 else (all_small - routed) / gap


def routing_rows(to_large: list[torch.Tensor], nll_small: torch.Tensor, nll_large: torch.Tensor,
                 fractions: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per target fraction: realised large fraction, routed/random/oracle quality and gap recovered."""
    n = len(nll_small)
    all_small, all_large = float(nll_small.mean()), float(nll_large.mean())
    benefit = nll_small - nll_large
    rows = []
    for fraction, large_mask in zip(fractions, to_large):
        k = int(large_mask.sum())
        routed = float(torch.where(large_mask, nll_large, nll_small).mean())
        oracle_mask = torch.zeros(n, dtype=torch.bool)
        oracle_mask[benefit.argsort(descending=True)[:k]] = True
        oracle = float(torch.where(oracle_mask, nll_large, nll_small).mean())
        random_quality = all_small + k / n * (all_large - all_small)  # expectation over random k-subsets
        rows.append({"target_fraction": fraction, "large_fraction": k / n, "routed_quality": routed,
                     "random_quality": random_quality, "oracle_quality": oracle,
                     "gap_recovered": _gap_recovered(all_small, all_large, routed),
                     "random_gap_recovered": _gap_recovered(all_small, all_large, random_quality),
                     "oracle_gap_recovered": _gap_recovered(all_small, all_large, oracle)})
    return rows


def calibrate(small: PathLike, large: Optional[PathLike] = None, out: Optional[PathLike] = None, *,
              data: Optional[PathLike] = None,
              num_queries: int = 2048, prompt_tokens: int = 32, continuation_tokens: int = 16,
              margin: Optional[float] = None,
              target_large_fraction: float = 0.3, holdout: float = 0.3, posthoc_queries: int = 64,
              deferral_queries: int = 1024, router: str = "auto", l2: float = 1e-2, batch_size: int = 8,
              seed: int = 0, device: Optional[str] = None, large_endpoint: Optional[str] = None,
              large_model: Optional[str] = None, large_api_key_env: Optional[str] = None,
              large_timeout_s: float = 60.0, metric: str = "loglik", verbose: bool = True) -> dict[str, Any]:
    """Builds the calibration set, fits the router, writes router.json and calibration_report.json.

    Args:
        small, large: checkpoint directories (with tokenizer.json); `large`
            None when `large_endpoint` labels the queries instead.
        out: output directory; default calibration/<small>__<large> in the
            working directory.
        data: the prepared data directory; default the small run's data.output.
        num_queries: calibration queries at most.
        prompt_tokens, continuation_tokens, margin, holdout, posthoc_queries:
            see the module NOTE.
        target_large_fraction: sets router.threshold (and posthoc_threshold).
        deferral_queries: fit queries the small model answers to fit the
            token-level deferral rule (0: none; post-hoc routing then uses the
            mean confidence).
        router: `logistic` (on the signals), `probe` (signals and hidden
            states), or `auto`: the one of the two that routes the held-out
            documents best (NOTE 4).
        l2: the logistic router's penalty.
        batch_size: sequences per forward pass.
        seed: query lengths and the held-out split.
        device: default cuda when available.
        large_endpoint, large_model: an OpenAI-compatible completions API
            (base URL ending in /v1) and its model, in place of `large`
            (`cascade.endpoint`); qualities are then in nats per character.
        large_api_key_env: the environment variable with the endpoint's key.
        large_timeout_s: one request's time-out.
        metric: `loglik` (continuation NLL) or `next_token` (greedy next-token
            error, binary; two checkpoints only): the quality labels are gains of.
        verbose: print the table.
    Returns:
        The report (as written to calibration_report.json).
    Raises:
        ValueError: a bad option (named), different tokenizers (both paths
            named), data prepared with another tokenizer, too few queries, or
            labels of one class only (change `margin`).
    """
    _check_options(num_queries=num_queries, prompt_tokens=prompt_tokens, continuation_tokens=continuation_tokens,
                   margin=margin, target_large_fraction=target_large_fraction, holdout=holdout,
                   posthoc_queries=posthoc_queries, deferral_queries=deferral_queries, router=router, l2=l2,
                   batch_size=batch_size, metric=metric)
    if metric == "next_token" and large_endpoint is not None:
        raise ValueError("metric: next_token compares the tiers' own next tokens, which an endpoint's tokenizer does "
                         "not share; use metric=loglik with large_endpoint")
    _check_large(large, large_endpoint, large_model, large_api_key_env, large_timeout_s)
    small, large = Path(small), None if large is None else Path(large)
    tokenizer_sha256, data_dir = check_pair_and_data(small, large, data)
    scorer = None
    if large_endpoint is not None:  # it answers and serves the model, before any work
        from cascade.endpoint import EndpointScorer

        scorer = EndpointScorer(large_endpoint, large_model, timeout_s=large_timeout_s,
                                api_key_env=large_api_key_env, batch_size=batch_size)
        scorer.check()
    large_label = str(large.resolve()) if large is not None else f"{scorer.endpoint} ({large_model})"
    large_name = _name(large) if large is not None else large_model
    out = Path(out) if out is not None else Path("calibration") / f"{_name(small)}__{large_name}"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    small_model, large_tier = load_tiers(small, large, device, prompt_tokens, continuation_tokens)

    # 1. The calibration queries, labelled with the large tier's gain (NOTE 1-3).
    queries = _calibration_queries(data_dir, small, scorer, num_queries, prompt_tokens, continuation_tokens, seed)
    config = small_model.config  # the probe's candidates are subsets of every layer's pooled hidden states
    full = HiddenFeatures(tuple(range(config.num_layers)), POOLINGS, config.hidden_size)
    features = prompt_signals(small_model, queries.prompts, batch_size=batch_size,
                              hidden=None if router == "logistic" else full)
    if scorer is None:
        nll_small, nll_large, unit = _tier_quality(small_model, large_tier, queries.pairs, metric, batch_size)
    else:  # both per character of the continuation (cascade.endpoint, NOTE 3)
        nll_small = continuation_nll(small_model, queries.pairs, batch_size, reduction="sum") / queries.num_chars
        nll_large, unit = queries.endpoint_nll, "nats/character"
    gain = nll_small - nll_large

    # 2. The router: candidates fitted on some documents, chosen on the held-out others (NOTE 4).
    heldout, fit = _split_by_document(queries.document_of, holdout, seed)
    margin = float(gain[fit].median()) if margin is None else float(margin)  # NOTE 3
    labels = (gain > margin).to(torch.float64)
    candidates, probe_report = _fit_candidates(features, gain, labels, fit, queries.document_of, full, router,
                                               margin, l2, seed)
    heldout_apgr = {name: routing_apgr(scores[heldout], gain[heldout]) for name, (_, scores) in candidates.items()}
    chosen = router if router != "auto" else max(
        candidates, key=lambda name: -math.inf if math.isnan(heldout_apgr[name]) else heldout_apgr[name])
    fitted, scores = candidates[chosen]

    # 3. Pre-generation routing on the held-out queries, thresholds at held-out quantiles (NOTE 4).
    h_thresholds = [threshold_for_large_fraction(scores[heldout], f) for f in REPORT_FRACTIONS]
    rows = routing_rows([scores[heldout] >= t for t in h_thresholds], nll_small[heldout], nll_large[heldout],
                        REPORT_FRACTIONS)
    for row, threshold in zip(rows, h_thresholds):
        row["threshold"] = threshold
    # 4. Post-hoc routing: the small model answers first (NOTE 5).
    posthoc = _posthoc(small_model, small, heldout[:posthoc_queries], fit[:deferral_queries], queries.prompts,
                       queries.document_of, nll_small, nll_large, margin, continuation_tokens, batch_size, device,
                       seed)
    _set_thresholds(fitted, scores, posthoc, target_large_fraction)
    fitted.metadata = {"small": str(small.resolve()), "large": large_label, "data": str(data_dir.resolve()),
                       "tokenizer_sha256": tokenizer_sha256, "num_queries": len(queries.pairs), "margin": margin,
                       "target_large_fraction": target_large_fraction, "quality_unit": unit}

    settings = {"num_queries": num_queries, "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens,
                "margin": margin, "holdout": holdout, "target_large_fraction": target_large_fraction,
                "posthoc_queries": posthoc_queries, "deferral_queries": deferral_queries, "router": router, "l2": l2,
                "seed": seed, "metric": metric}
    h_small, h_large, h_labels = nll_small[heldout], nll_large[heldout], labels[heldout]
    report = {
        "small": str(small.resolve()), "large": large_label, "data": str(data_dir.resolve()),
        "tokenizer_sha256": tokenizer_sha256,
        "large_endpoint": None if scorer is None else {"endpoint": scorer.endpoint, "model": large_model,
                                                       "unscored_queries": queries.unscored},
        "settings": settings,
        "num_queries": len(queries.pairs), "num_fit": len(fit), "num_heldout": len(heldout),
        "num_documents": queries.num_documents,
        "num_heldout_documents": len(torch.unique(queries.document_of[heldout])),
        "label_rate": float(labels.mean()), "heldout_label_rate": float(h_labels.mean()),
        "auc_heldout": roc_auc(scores[heldout], h_labels), "auc_fit": roc_auc(scores[fit], labels[fit]),
        "quality": {"metric": ("mean greedy next-token error (lower is better), held-out" if metric == "next_token"
                               else f"mean continuation NLL ({unit}, lower is better), held-out"), "unit": unit,
                    "all_small": float(h_small.mean()), "all_large": float(h_large.mean()),
                    "oracle_best": float(torch.minimum(h_small, h_large).mean())},
        "router": {"kind": chosen, "weights": dict(zip(SIGNAL_NAMES, fitted.weights)), "bias": fitted.bias,
                   "hidden": fitted.hidden.to_dict() if fitted.hidden is not None else None,
                   "threshold": fitted.threshold, "posthoc_threshold": fitted.posthoc_threshold},
        "candidates": {name: {"heldout_apgr": None if math.isnan(value) else value,
                              "auc_heldout": roc_auc(candidates[name][1][heldout], h_labels)}
                       for name, value in heldout_apgr.items()},
        "probe": probe_report,
        "fractions": rows,
        "posthoc": posthoc,
        "heldout_queries": [{"index": i, "prompt_tokens": len(queries.prompts[i]), "nll_small": float(nll_small[i]),
                             "nll_large": float(nll_large[i]), "score": float(scores[i]), "label": int(labels[i])}
                            for i in heldout.tolist()],
    }
    out.mkdir(parents=True, exist_ok=True)
    fitted.save(out / "router.json")
    write_json(out / "calibration_report.json", report)
    if verbose:
        print(format_report(report, out))
    return report


def load_tiers(small: Path, large: Optional[Path], device: str, prompt_tokens: int,
               reference_tokens: int) -> tuple[MoETransformer, Optional[MoETransformer]]:
    """The small tier and the large one (None: an endpoint) in eval mode; refused when a query (the longest prompt
    and its reference tokens) does not fit either's max_seq_len."""
    small_model = load_checkpoint(small, device=device).eval()
    large_model = load_checkpoint(large, device=device).eval() if large is not None else None
    max_len = min(model.config.max_seq_len for model in (small_model, large_model) if model is not None)
    if prompt_tokens + reference_tokens > max_len:
        raise ValueError(f"prompt_tokens: prompt_tokens ({prompt_tokens}) + {reference_tokens} reference tokens "
                         f"exceed the models' max_seq_len ({max_len})")
    return small_model, large_model


@dataclass
class _Queries:
    """The calibration queries: (prompt, continuation) pairs, each one's document, and, with an endpoint, its NLL
    per character and the characters of each continuation (`cascade.endpoint`)."""

    pairs: list[tuple[list[int], list[int]]]
    document_of: torch.Tensor
    num_documents: int
    endpoint_nll: Optional[torch.Tensor] = None
    num_chars: Optional[torch.Tensor] = None
    unscored: int = 0

    def __post_init__(self) -> None:
        self.prompts = [query for query, _ in self.pairs]


def _calibration_queries(data_dir: Path, small: Path, scorer, num_queries: int, prompt_tokens: int,
                         continuation_tokens: int, seed: int) -> _Queries:
    """Query windows of the calibration split (NOTE 1), those the endpoint cannot score left out; refused when
    too few remain."""
    documents = read_split_documents(data_dir, "calibration", num_queries, continuation_tokens + 1)
    windows = query_windows(documents, prompt_tokens, continuation_tokens, seed, num_queries)
    if len(windows) < MIN_QUERIES or len(documents) < 2:
        raise ValueError(f"num_queries: the calibration split of {data_dir} gives only {len(windows)} queries of "
                         f"prompt_tokens={prompt_tokens} + continuation_tokens={continuation_tokens} from "
                         f"{len(documents)} documents; at least {MIN_QUERIES} queries from 2 documents are needed "
                         f"(prepare the data with a larger data.calibration_fraction)")
    endpoint_nll = num_chars = None
    unscored = 0
    if scorer is not None:  # the endpoint's NLL per character; queries it cannot score are left out
        windows, endpoint_nll, num_chars, unscored = _score_on_endpoint(scorer, small, windows)
        if len(windows) < MIN_QUERIES or len({document for _, document in windows}) < 2:
            raise ValueError(f"large_endpoint: only {len(windows)} queries could be scored on {scorer.endpoint} "
                             f"({unscored} left out: their echoed tokens do not spell the prompt text)")
    return _Queries([pair for pair, _ in windows], torch.tensor([document for _, document in windows]),
                    len(documents), endpoint_nll, num_chars, unscored)


def _set_thresholds(router: DifficultyRouter, scores: torch.Tensor, posthoc: dict[str, Any],
                    target_large_fraction: float) -> None:
    """The served router's thresholds: its score quantiles on every calibration query, the post-hoc table and the
    token-level deferral rule of `posthoc` (taken out of it), each at `target_large_fraction`."""
    router.deferral = posthoc.pop("deferral")
    router.fraction_thresholds = [[f, threshold_for_large_fraction(scores, f)] for f in TABLE_FRACTIONS]
    router.threshold = router.threshold_for_fraction(target_large_fraction)
    router.posthoc_fraction_thresholds = posthoc.pop("table")
    router.posthoc_threshold = router.posthoc_threshold_for_fraction(target_large_fraction)
    if router.deferral is not None:
        router.deferral.threshold = router.deferral.threshold_for_fraction(target_large_fraction)


def _tier_quality(small_model: MoETransformer, large_model: MoETransformer, pairs: list, metric: str,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(small's, large's per-query loss, its unit) on `metric` (NOTE 2): continuation NLL or next-token error."""
    if metric == "next_token":  # quality as an error: 1 - (greedy next token is right)
        return (1 - next_token_correct(small_model, pairs, batch_size),
                1 - next_token_correct(large_model, pairs, batch_size), "next-token error")
    return continuation_nll(small_model, pairs, batch_size), continuation_nll(large_model, pairs, batch_size), \
        "nats/token"


def _fit_candidates(features: torch.Tensor, gain: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor,
                    document_of: torch.Tensor, full: HiddenFeatures, router_kind: str, margin: float, l2: float,
                    seed: int) -> tuple[dict[str, tuple[DifficultyRouter, torch.Tensor]], Optional[dict[str, Any]]]:
    """The candidate routers fitted on the `fit` queries (NOTE 4) with their scores on every query, and the
    probe's cross-validation report (None without a probe)."""
    signals = features[:, :len(SIGNAL_NAMES)]
    try:
        logistic = DifficultyRouter.fit(signals[fit], labels[fit], l2=l2)
    except ValueError as err:
        raise ValueError(f"margin: {err} (label rate {float(labels.mean()):.2f} with margin={margin}; the "
                         f"large model is better by more than the margin on {int(labels.sum())} of "
                         f"{len(labels)} queries); choose another margin") from None
    candidates = {"logistic": (logistic, logistic.score(signals))}
    if router_kind == "logistic":
        return candidates, None
    options = [HiddenFeatures((layer,), POOLINGS, full.hidden_size) for layer in full.layers] + [full]
    fit_documents = document_of[fit]
    probe, probe_report = fit_probe(features[fit], gain[fit], fit_documents.tolist(), full, options,
                                    margin=margin, folds=min(5, len(torch.unique(fit_documents))), seed=seed)
    columns = list(range(len(SIGNAL_NAMES))) + [len(SIGNAL_NAMES) + i for i in probe.hidden.columns_in(full)]
    candidates["probe"] = (probe, probe.score(features[:, columns]))
    return candidates, probe_report


def _check_large(large: Optional[PathLike], endpoint: Optional[str], model: Optional[str],
                 api_key_env: Optional[str], timeout_s: float) -> None:
    """Exactly one of a large checkpoint and an endpoint, and the endpoint's keys only with an endpoint."""
    if (large is None) == (endpoint is None):
        raise ValueError("large: give either large=CKPT (a checkpoint) or large_endpoint=URL large_model=NAME (an "
                         "OpenAI-compatible endpoint), not " + ("both" if large is not None else "neither"))
    if endpoint is None:
        for key, value in (("large_model", model), ("large_api_key_env", api_key_env)):
            if value is not None:
                raise ValueError(f"{key}: only with large_endpoint=URL (large={large} is a checkpoint)")
        return
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"large_endpoint: expected an http(s) URL ending in /v1, got {endpoint!r}")
    if not model:
        raise ValueError("large_model=NAME is required with large_endpoint (the model the endpoint serves)")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"large_timeout_s must be a positive number, got {timeout_s!r}")


def _score_on_endpoint(scorer, small: Path, windows: list) -> tuple[list, torch.Tensor, torch.Tensor, int]:
    """The windows the endpoint could score, its NLL per character of each, the small tier's characters, the
    number left out (`cascade.endpoint`, NOTE 1-4)."""
    from moe.generate import load_tokenizer

    tokenizer = load_tokenizer(small)
    texts, candidates = [], []
    for window in windows:
        (query, continuation), _ = window
        prompt, full = tokenizer.decode(query), tokenizer.decode(query + continuation)
        if full.startswith(prompt) and len(full) > len(prompt):
            texts.append((prompt, full))
            candidates.append(window)
    scored = scorer.score(texts)
    kept = [i for i, entry in enumerate(scored) if entry.nll is not None and entry.num_chars > 0]
    nll = torch.tensor([scored[i].nll / scored[i].num_chars for i in kept], dtype=torch.float64)
    num_chars = torch.tensor([len(texts[i][1]) - len(texts[i][0]) for i in kept], dtype=torch.float64)
    return [candidates[i] for i in kept], nll, num_chars, len(windows) - len(kept)


def _split_by_document(document_of: torch.Tensor, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, fit) query indices: a `holdout` share of the documents (at least one each side), all their queries."""
    documents = torch.unique(document_of)
    order = documents[torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed))]
    num_heldout = min(len(documents) - 1, max(1, round(holdout * len(documents))))
    is_heldout = torch.isin(document_of, order[:num_heldout])
    return torch.nonzero(is_heldout).squeeze(1), torch.nonzero(~is_heldout).squeeze(1)


def _posthoc(small_model: MoETransformer, small: Path, heldout: torch.Tensor, fit: torch.Tensor,
             queries: list[list[int]], document_of: torch.Tensor, nll_small: torch.Tensor, nll_large: torch.Tensor,
             margin: float, max_tokens: int, batch_size: int, device: str, seed: int) -> dict[str, Any]:
    """The small model answers held-out queries (and `fit` ones for the token-level deferral rule, NOTE 5)."""
    from moe.generate import Generator, SamplingParams, load_tokenizer

    generator = Generator(small_model, load_tokenizer(small), max_batch_size=batch_size, device=device)
    index, fit_index = heldout.tolist(), fit.tolist()
    completions = generator.generate_ids([queries[i] for i in index + fit_index],
                                         [SamplingParams(max_tokens=max_tokens)] * (len(index) + len(fit_index)))
    answers, fit_answers = completions[:len(index)], completions[len(index):]
    labels = (nll_small - nll_large > margin).to(torch.float64)
    confidence = torch.tensor([c.mean_confidence for c in answers], dtype=torch.float64)
    thresholds = [confidence_threshold_for_escalation(confidence, f) for f in REPORT_FRACTIONS]
    fraction_rows = routing_rows([confidence < t for t in thresholds], nll_small[index], nll_large[index],
                                 REPORT_FRACTIONS)
    for row, threshold in zip(fraction_rows, thresholds):
        row["threshold"] = threshold
    result = {"num_queries": len(index), "mean_confidence": float(confidence.mean()),
              "auc_heldout": roc_auc(-confidence, labels[index]),
              "all_small": float(nll_small[index].mean()), "all_large": float(nll_large[index].mean()),
              "fractions": fraction_rows,
              "table": [[f, confidence_threshold_for_escalation(confidence, f)] for f in TABLE_FRACTIONS],
              "deferral": None}
    fit_documents = document_of[fit]
    if len(torch.unique(fit_documents)) < 2 or len(fit_index) < MIN_QUERIES:
        return result
    gain = nll_small - nll_large
    rule, rule_report = DeferralRule.fit([c.token_logprobs for c in fit_answers], gain[fit], fit_documents.tolist(),
                                         margin=margin, folds=min(5, len(torch.unique(fit_documents))), seed=seed)
    fit_scores = rule.score([c.token_logprobs for c in fit_answers])
    rule.fraction_thresholds = [[f, threshold_for_large_fraction(fit_scores, f)] for f in TABLE_FRACTIONS]
    h_scores = rule.score([c.token_logprobs for c in answers])
    rule_rows = routing_rows([h_scores >= threshold_for_large_fraction(h_scores, f) for f in REPORT_FRACTIONS],
                             nll_small[index], nll_large[index], REPORT_FRACTIONS)
    result["deferral"] = rule
    result["deferral_report"] = {**rule_report, "num_fit_answers": len(fit_index),
                                 "heldout_apgr": routing_apgr(h_scores, gain[index]),
                                 "confidence_heldout_apgr": routing_apgr(-confidence, gain[index]),
                                 "fractions": rule_rows}
    return result


def format_report(report: dict[str, Any], out: Path) -> str:
    """The printed summary: one line per target large-call fraction."""
    quality, posthoc = report["quality"], report["posthoc"]
    auc = report["auc_heldout"]
    lines = [
        f"calibration: {report['num_queries']} queries ({report['num_fit']} fit, {report['num_heldout']} held out); "
        f"label rate {report['label_rate']:.2f} (large better by > {report['settings']['margin']} "
        f"{quality['unit']}); "
        f"held-out AUC {'n/a' if auc is None else f'{auc:.3f}'}",
        f"held-out {quality['metric'].replace(', held-out', '')}: all-small {quality['all_small']:.4f}, "
        f"all-large {quality['all_large']:.4f}, "
        f"per-query best {quality['oracle_best']:.4f}",
        f"post-hoc (small answers, low confidence escalates) on {posthoc['num_queries']} held-out queries: "
        f"all-small {posthoc['all_small']:.4f}, all-large {posthoc['all_large']:.4f}",
        f"{'large%':>6} {'routed':>8} {'random':>8} {'oracle':>8} {'recovered':>9} | {'post-hoc':>8} {'recovered':>9}",
    ]
    for row, post in zip(report["fractions"], posthoc["fractions"]):
        lines.append(f"{row['large_fraction']:>6.0%} {row['routed_quality']:>8.4f} {row['random_quality']:>8.4f} "
                     f"{row['oracle_quality']:>8.4f} {_percent(row['gap_recovered']):>9} | "
                     f"{post['routed_quality']:>8.4f} {_percent(post['gap_recovered']):>9}")
    router = report["router"]
    lines.append("candidates (held-out APGR): " + ", ".join(
        f"{name} {_fmt3(entry['heldout_apgr'])}" for name, entry in report["candidates"].items())
        + f"; written: {router['kind']}" + (f" (hidden states of layers {router['hidden']['layers']})"
                                              if router["hidden"] else ""))
    deferral = posthoc.get("deferral_report")
    if deferral is not None:
        lines.append(f"token-level deferral: held-out APGR {_fmt3(deferral['heldout_apgr'])} (mean confidence: "
                     f"{_fmt3(deferral['confidence_heldout_apgr'])}) on {posthoc['num_queries']} held-out answers, "
                     f"fitted on {deferral['num_fit_answers']}")
    lines.append(f"router: threshold {router['threshold']:.4f} at target_large_fraction "
                 f"{report['settings']['target_large_fraction']}, post-hoc confidence threshold "
                 f"{router['posthoc_threshold']:.4f}")
    lines.append(f"wrote {out / 'router.json'} and {out / 'calibration_report.json'}")
    return "\n".join(lines)


def _fmt3(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _name(checkpoint: Path) -> str:
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name == "checkpoints":
        return f"{checkpoint.parent.parent.name}_{checkpoint.name}"
    return checkpoint.name


def _check_options(**options: Any) -> None:
    check_positive_ints(options, "num_queries", "prompt_tokens", "continuation_tokens", "posthoc_queries", "batch_size")
    for key in ("margin", "l2"):
        if key == "margin" and options[key] is None:
            continue
        if not isinstance(options[key], (int, float)) or not math.isfinite(options[key]):
            raise ValueError(f"{key} must be a finite number, got {options[key]!r}")
    if not options["l2"] > 0:
        raise ValueError(f"l2 must be positive, got {options['l2']!r}")
    if not 0 <= options["target_large_fraction"] <= 1:
        raise ValueError(f"target_large_fraction must be in [0, 1], got {options['target_large_fraction']!r}")
    if not 0 < options["holdout"] < 1:
        raise ValueError(f"holdout must be in (0, 1), got {options['holdout']!r}")
    if options["metric"] not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {options['metric']!r}")
    if options["router"] not in ROUTER_KINDS:
        raise ValueError(f"router must be one of {list(ROUTER_KINDS)}, got {options['router']!r}")
    deferral_queries = options["deferral_queries"]
    if not isinstance(deferral_queries, int) or isinstance(deferral_queries, bool) or deferral_queries < 0:
        raise ValueError(f"deferral_queries must be an integer >= 0, got {deferral_queries!r}")


def main(argv: Optional[list[str]] = None) -> None:
    run(calibrate, argv, OPTIONS, REQUIRED, USAGE)


if __name__ == "__main__":
    main()
