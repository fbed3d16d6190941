"""`python -m cascade.evaluate small=CKPT large=CKPT output=DIR`: how much of the large tier's quality each
router buys, against the share of large-model calls and against real cost.

    python -m cascade.evaluate small=runs/mixtral_tiny/checkpoints/step_00000300 \\
                               large=runs/mixtral_base/checkpoints/step_00000500 output=runs/cascade/eval \\
                               [data=DIR] [num_queries=1024] [calibration_queries=2048] [prompt_tokens=32] \\
                               [continuation_tokens=16] \\
                               [line_tokens=32] [margin=X] [l2=0.01] [bootstrap=200] [batch_size=8] [seed=0] \\
                               [metric=loglik|next_token] [device=cpu|cuda]

Writes DIR/cascade_eval.json and DIR/cascade_eval.png, and prints a table.

NOTE: what is measured.
1. Queries are windows of held-out documents (`cascade.calibrate.make_queries`):
   a prompt of K tokens and the document's next W = max(continuation_tokens,
   line_tokens) tokens as its reference. The calibration set comes from the
   calibration split and the test set from the validation split of the
   prepared data: whole documents that training never read, and no document
   in both.
2. Quality of a tier on a query, three metrics: `loglik`, the mean
   log-likelihood (nats/token) of the first `continuation_tokens` reference
   tokens, teacher-forced; `exact_match`, 1 when the tier's greedy next line
   (stop at a newline, at most `line_tokens` tokens) equals the reference's
   next line; `next_token`, 1 when the tier's greedy next token is the
   reference's (a binary outcome on which the tiers differ for ~15% of
   queries, where whole lines rarely match for either). `metric` picks the one
   the routers are fitted on (their label: its calibration gain) and the
   summary columns report; every metric's curves are in the JSON.
3. A router is a score per query (higher: send to large). Routing the k
   highest-scoring of N test queries to the large tier gives quality q(k);
   PGR(k) = (q(k) - q(0)) / (q(N) - q(0)), the performance gap recovered.
   APGR is the area under PGR over the large-call fraction k/N (RouteLLM's
   definition; random routing gives 0.5), CPT(p) the smallest large-call
   fraction with PGR >= p (interpolated between neighbouring k). Queries of
   equal score are taken as a block at the average of its members, so a
   constant score is exactly random routing in expectation.
4. Routers: `random`; each signal of `moe.difficulty.SIGNAL_NAMES` alone
   (its sign chosen on the calibration set); `learned` (the logistic router
   `cascade.calibrate` fits, label: the large tier better on `metric` by more
   than `margin`, default the calibration set's median gain) and
   `learned_regression` (ridge regression of the gain); `probe` (ridge of the
   gain on the signals and the small tier's pooled prefill hidden states,
   layers and penalty chosen by cross-validation over calibration documents:
   `moe.difficulty.fit_probe`); `posthoc` (the small tier answers first; its
   answer's mean token confidence, low escalates, as FrugalGPT/AutoMix);
   `deferral` (post-hoc on quantiles of the answer's per-token NLL, Gupta et
   al. 2024: `moe.difficulty.DeferralRule`, fitted on the small tier's answers
   to the calibration queries); `oracle` (the test set's own gains: an upper
   bound).
5. Cost is forward FLOPs per query: 2 * active parameters (output head
   included) per token plus attention (4 * layers * heads * head_dim * the
   attended context, sliding window respected), summed over the prefill and
   the decoded answer of each tier, with the real answer lengths. A
   pre-generation router adds the small tier's prefill of the prompt to the
   queries it sends to large (a query it keeps reuses that prefill, as the
   service does); post-hoc pays the small tier's whole answer on every query.
   Random and oracle routing are charged no router. Cost fractions are
   relative to sending every query to the large tier.
6. Spread: APGR and CPT are recomputed on `bootstrap` resamples of the test
   queries (with replacement, the calibration fit fixed); the JSON carries
   their standard deviation.
7. Wall time: `timing_queries` test queries are answered one at a time, in
   this process, by each tier (greedy next line) and prefilled by the small
   tier for the router, the three interleaved query by query; the mean
   seconds per query give the same charges as NOTE 5 in seconds, and each
   router's `time_cpt50`/`time_cpt80` (share of all-large wall time at PGR
   50%/80%). Batch 1 on this machine, not through the service (see
   benchmarks/serve_load.py for latency under load).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from moe.checkpoint import load_checkpoint
from moe.config import ModelConfig
from moe.difficulty import (POOLINGS, SIGNAL_NAMES, DeferralRule, DifficultyRouter, HiddenFeatures, fit_probe,
                            prompt_signals)
from moe.model import MoETransformer, count_parameters

from cascade.calibrate import (check_pair_and_data, continuation_nll, load_tiers, next_token_correct, query_windows,
                               read_split_documents, roc_auc)
from cascade.cli import check_positive_ints, parse_key_values, run, write_json

USAGE = ("usage: python -m cascade.evaluate small=CKPT large=CKPT output=DIR [data=DIR] [num_queries=N] "
         "[calibration_queries=N] "
         "[prompt_tokens=K] [continuation_tokens=M] [line_tokens=L] [margin=X] [l2=X] [bootstrap=N] "
         "[batch_size=N] [seed=N] [device=D] [distilled=CKPT] [timing_queries=N] [metric=loglik|next_token]")
METRICS = ("loglik", "exact_match", "next_token")
FIT_METRICS = ("loglik", "next_token")  # measured on the calibration queries too (no generation needed)
CURVE_POINTS = 101  # large-call fractions 0, 0.01, ..., 1 in the JSON curves
MIN_QUERIES = 10

PathLike = Union[str, os.PathLike]

# key: (type, default); None as default means optional without a value.
OPTIONS: dict[str, tuple[type, Any]] = {
    "small": (str, None), "large": (str, None), "output": (str, None), "data": (str, None),
    "num_queries": (int, 1024), "calibration_queries": (int, 2048), "prompt_tokens": (int, 32),
    "continuation_tokens": (int, 16),
    "line_tokens": (int, 32), "margin": (float, None), "l2": (float, 1e-2), "bootstrap": (int, 200),
    "batch_size": (int, 8), "seed": (int, 0), "device": (str, None), "distilled": (str, None),
    "timing_queries": (int, 64), "metric": (str, "loglik"),
}


REQUIRED = {"small": "CKPT", "large": "CKPT", "output": "DIR"}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """`key=value` arguments to typed values, defaults filled in; raises ValueError naming the key."""
    return parse_key_values(argv, OPTIONS, REQUIRED, USAGE)


# ---- cost --------------------------------------------------------------------------------

def forward_flops(config: ModelConfig, num_positions: int) -> float:
    """Forward FLOPs of positions 0 .. num_positions - 1 of one sequence (NOTE 5).

    Each position costs 2 * active parameters (output head included, the
    embedding lookup not) plus 4 * layers * heads * head_dim * the number of
    positions it attends to (QK^T and the weighted sum of V).
    """
    if num_positions <= 0:
        return 0.0
    per_token = 2.0 * count_parameters(config)["active_non_embedding"]
    attn_width = 4.0 * config.num_layers * config.num_heads * config.head_dim
    window = config.sliding_window or num_positions
    n, w = num_positions, min(window, num_positions)
    attended = w * (w + 1) / 2 + (n - w) * w  # sum over t of min(t + 1, window)
    return n * per_token + attn_width * attended


def answer_flops(config: ModelConfig, prompt_tokens: int, generated_tokens: int) -> float:
    """Prefill of the prompt plus decoding `generated_tokens` (the last one is never fed back)."""
    return forward_flops(config, prompt_tokens + max(generated_tokens, 1) - 1)


# ---- curves ------------------------------------------------------------------------------

def gain_curve(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over the k highest-scoring queries, k = 0..N; (N + 1,) float64.

    Queries of equal score form a block taken in order of nothing: inside a
    block the curve is the straight line between the block's ends, the
    expectation over every order of its members (NOTE 3).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if scores.shape != values.shape:
        raise ValueError(f"scores: {scores.numel()} scores for {values.numel()} values")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    n = scores.numel()
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_values = scores[order], values[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_values.cumsum(0)])
    if n == 0:
        return cumulative
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    block_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # block of the i-th query taken
    start, end, count = starts[block_of], ends[block_of], counts[block_of].to(torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    inside = cumulative[start] + (k - start) * (cumulative[end] - cumulative[start]) / count
    return torch.cat([inside, cumulative[-1:]])


def pgr_curve(scores: torch.Tensor, quality_small: torch.Tensor, quality_large: torch.Tensor) -> torch.Tensor:
    """PGR(k) for k = 0..N (NOTE 3); (N + 1,) float64.

    Raises:
        ValueError: the large tier is not better in total on these queries
            (PGR is then undefined).
    """
    gain = torch.as_tensor(quality_large, dtype=torch.float64) - torch.as_tensor(quality_small, dtype=torch.float64)
    curve = gain_curve(scores, gain)
    if not float(curve[-1]) > 1e-12 * max(1.0, float(gain.abs().sum())):
        raise ValueError(f"the large tier is not better than the small one on these queries (total gain "
                         f"{float(curve[-1]):.4g}): the performance gap recovered is undefined")
    return curve / curve[-1]


def area(x: torch.Tensor, y: torch.Tensor) -> float:
    """Trapezoid area under y(x)."""
    return float(((y[1:] + y[:-1]) * (x[1:] - x[:-1])).sum() / 2)


def first_crossing(x: torch.Tensor, y: torch.Tensor, level: float) -> Optional[float]:
    """The smallest x where y reaches `level`, linear between neighbouring points; None if it never does."""
    reached = torch.nonzero(y >= level - 1e-12).reshape(-1)
    if reached.numel() == 0:
        return None
    i = int(reached[0])
    if i == 0 or float(y[i]) == float(y[i - 1]):
        return float(x[i])
    t = (level - float(y[i - 1])) / (float(y[i]) - float(y[i - 1]))
    return float(x[i - 1] + t * (x[i] - x[i - 1]))


def router_summary(scores: torch.Tensor, quality_small: torch.Tensor, quality_large: torch.Tensor,
                   cost_if_small: torch.Tensor, cost_if_large: torch.Tensor, cost_all_large: float
                   ) -> dict[str, Any]:
    """APGR, CPT(50%/80%) over the large-call fraction and over the cost fraction, and the full curves."""
    n = scores.numel()
    fraction = torch.arange(n + 1, dtype=torch.float64) / n
    pgr = pgr_curve(scores, quality_small, quality_large)
    cost = (float(cost_if_small.sum()) + gain_curve(scores, cost_if_large - cost_if_small)) / cost_all_large
    summary: dict[str, Any] = {"apgr": area(fraction, pgr)}
    for level in (50, 80):
        summary[f"cpt{level}"] = first_crossing(fraction, pgr, level / 100)
        # the cost where PGR first reaches the level, on the same interpolation
        at = summary[f"cpt{level}"]
        summary[f"cost_cpt{level}"] = None if at is None else float(_interpolate_at(fraction, cost, at))
    summary["cost_range"] = [float(cost.min()), float(cost.max())]
    summary["_curves"] = (fraction, pgr, cost)
    return summary


def _interpolate_at(x: torch.Tensor, y: torch.Tensor, at: float) -> float:
    i = int(torch.searchsorted(x, torch.tensor([at], dtype=torch.float64), right=False)[0])
    if i == 0:
        return float(y[0])
    if i >= x.numel():
        return float(y[-1])
    t = (at - float(x[i - 1])) / (float(x[i]) - float(x[i - 1]))
    return float(y[i - 1] + t * (y[i] - y[i - 1]))


def _resample_points(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    grid = torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64)
    return [round(_interpolate_at(x, y, float(g)), 6) for g in grid]


# ---- routers -----------------------------------------------------------------------------

def signal_directions(signals: torch.Tensor, gain: torch.Tensor) -> dict[str, int]:
    """+1 where a signal's Spearman correlation with the gain is >= 0 on the calibration set, else -1."""
    directions = {}
    ranked_gain = _ranks(gain)
    for column, name in enumerate(SIGNAL_NAMES):
        directions[name] = 1 if _pearson(_ranks(signals[:, column]), ranked_gain) >= 0 else -1
    return directions


def fit_ridge(signals: torch.Tensor, target: torch.Tensor, l2: float) -> dict[str, list[float]]:
    """Ridge regression of `target` on standardised signals (closed form, float64)."""
    x_NF = signals.to(torch.float64)
    mean_F, std_F = x_NF.mean(0), x_NF.std(0, unbiased=False)
    std_F = torch.where(std_F > 1e-12, std_F, torch.ones_like(std_F))
    z_NF = (x_NF - mean_F) / std_F
    y_N = target.to(torch.float64) - target.to(torch.float64).mean()
    n, f = z_NF.shape
    weights_F = torch.linalg.solve(z_NF.T @ z_NF + l2 * n * torch.eye(f, dtype=torch.float64), z_NF.T @ y_N)
    return {"mean": mean_F.tolist(), "std": std_F.tolist(), "weights": weights_F.tolist()}


def ridge_scores(model: dict[str, list[float]], signals: torch.Tensor) -> torch.Tensor:
    mean_F, std_F, weights_F = (torch.tensor(model[k], dtype=torch.float64) for k in ("mean", "std", "weights"))
    return ((signals.to(torch.float64) - mean_F) / std_F) @ weights_F


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    values = values.to(torch.float64)
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float64)
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return 0.0 if denominator == 0 else float((a * b).sum()) / denominator


# ---- measurement -------------------------------------------------------------------------

def next_line(text: str) -> str:
    """The text before the first newline (the whole text when there is none)."""
    return text.split("\n", 1)[0]


def tier_answers(model: MoETransformer, checkpoint: Path, prompts: list[list[int]], line_tokens: int,
                 batch_size: int, device: str):
    """Greedy next-line answers of one tier: (completions, generator)."""
    from moe.generate import Generator, SamplingParams, load_tokenizer

    generator = Generator(model, load_tokenizer(checkpoint), max_batch_size=batch_size, device=device)
    params = [SamplingParams(max_tokens=line_tokens, stop=("\n",))] * len(prompts)
    return generator.generate_ids(prompts, params), generator


def _query_sets(data_dir: Path, prompt_tokens: int, reference_tokens: int, seed: int, calibration_queries: int,
                num_queries: int) -> tuple[dict[str, list], dict[str, list], list[int]]:
    """(calibration and test query pairs, their documents, each calibration query's document) (NOTE 1)."""
    documents = {name: read_split_documents(data_dir, split, 1 << 30, reference_tokens + 1)
                 for name, split in (("calibration", "calibration"), ("test", "validation"))}
    windows = {"calibration": query_windows(documents["calibration"], prompt_tokens, reference_tokens, seed,
                                            calibration_queries),
               "test": query_windows(documents["test"], prompt_tokens, reference_tokens, seed + 1, num_queries)}
    sets = {name: [pair for pair, _ in found] for name, found in windows.items()}
    calibration_documents = [document for _, document in windows["calibration"]]
    for name, pairs in sets.items():
        if len(pairs) < MIN_QUERIES:
            split = "calibration" if name == "calibration" else "validation"
            raise ValueError(f"data: the {split} split of {data_dir} gives only {len(pairs)} {name} queries of "
                             f"prompt_tokens={prompt_tokens} + {reference_tokens} reference tokens from "
                             f"{len(documents[name])} documents; at least {MIN_QUERIES} are needed (prepare it "
                             f"with a larger data.{split}_fraction)")
    return sets, documents, calibration_documents


def _measure(small_model: MoETransformer, large_model: MoETransformer, pairs: list, full: HiddenFeatures,
             continuation_tokens: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The small tier's prefill features and both tiers' loglik and next-token quality on the queries (NOTE 2)."""
    scored = [(query, reference[:continuation_tokens]) for query, reference in pairs]
    features = prompt_signals(small_model, [query for query, _ in pairs], batch_size=batch_size, hidden=full)
    return {
        "features": features,
        "signals": features[:, :len(SIGNAL_NAMES)],
        "loglik_small": -continuation_nll(small_model, scored, batch_size),
        "loglik_large": -continuation_nll(large_model, scored, batch_size),
        "next_token_small": next_token_correct(small_model, pairs, batch_size),
        "next_token_large": next_token_correct(large_model, pairs, batch_size),
    }


def _fit_routers(cal: dict[str, torch.Tensor], test: dict[str, torch.Tensor], full: HiddenFeatures,
                 calibration_documents: list[int], calibration_answers: list, answers_small: list,
                 confidence: torch.Tensor, metric: str, margin: Optional[float], l2: float,
                 seed: int) -> tuple[dict[str, tuple[torch.Tensor, str]], dict[str, Any]]:
    """Every router of NOTE 4 fitted on the calibration queries' gain on `metric`: ({name: (test scores, charge)},
    the fitted parts the report describes)."""
    cal_gain = cal[f"{metric}_large"] - cal[f"{metric}_small"]
    margin = float(cal_gain.median()) if margin is None else float(margin)
    labels = (cal_gain > margin).to(torch.float64)
    try:
        learned = DifficultyRouter.fit(cal["signals"], labels, l2=l2)
    except ValueError as err:
        raise ValueError(f"margin: {err} (the large tier beats the small one on {metric} by more than "
                         f"margin={margin} on {int(labels.sum())} of {len(labels)} calibration queries)") from None
    ridge = fit_ridge(cal["signals"], cal_gain, l2)
    directions = signal_directions(cal["signals"], cal_gain)
    candidates = [HiddenFeatures((layer,), POOLINGS, full.hidden_size) for layer in full.layers] + [full]
    probe, probe_report = fit_probe(cal["features"], cal_gain, calibration_documents, full, candidates,
                                    margin=margin, seed=seed)
    deferral, deferral_report = DeferralRule.fit([a.token_logprobs for a in calibration_answers], cal_gain,
                                                 calibration_documents, margin=margin, seed=seed)
    probe_columns = list(range(len(SIGNAL_NAMES))) + [len(SIGNAL_NAMES) + i for i in probe.hidden.columns_in(full)]
    n_test = len(confidence)
    routers: dict[str, tuple[torch.Tensor, str]] = {"random": (torch.zeros(n_test, dtype=torch.float64), "none")}
    for column, name in enumerate(SIGNAL_NAMES):
        routers[f"signal:{name}"] = (directions[name] * test["signals"][:, column], "prefill")
    routers["learned"] = (learned.score(test["signals"]), "prefill")
    routers["learned_regression"] = (ridge_scores(ridge, test["signals"]), "prefill")
    routers["probe"] = (probe.score(test["features"][:, probe_columns]), "prefill")
    routers["posthoc"] = (-confidence, "posthoc")
    routers["deferral"] = (deferral.score([a.token_logprobs for a in answers_small]), "posthoc")
    fitted = {"margin": margin, "labels": labels, "learned": learned, "ridge": ridge, "directions": directions,
              "probe": probe, "probe_report": probe_report, "deferral_report": deferral_report}
    return routers, fitted


def _summarize_routers(routers: dict[str, tuple[torch.Tensor, str]], oracle_scores: dict[str, torch.Tensor],
                       test: dict[str, torch.Tensor], charges: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       time_charges: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]], cost_all_large: float,
                       metric: str, bootstrap: int, seed: int,
                       labels: torch.Tensor) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, ...]]]:
    """Per router (and the oracle), per metric: APGR, CPT, costs, bootstrap spread and curves (NOTE 3, 5, 6)."""
    n_test = len(labels)
    results: dict[str, Any] = {}
    curves: dict[str, tuple[torch.Tensor, ...]] = {}
    generator_rng = torch.Generator().manual_seed(seed)
    resamples = [torch.randint(n_test, (n_test,), generator=generator_rng) for _ in range(bootstrap)]
    for name in [*routers, "oracle"]:
        entry: dict[str, Any] = {}
        for shown in METRICS:
            scores, charge = routers.get(name, (oracle_scores[shown], "none"))
            q_small, q_large = test[f"{shown}_small"], test[f"{shown}_large"]
            if not float(q_large.sum() - q_small.sum()) > 0:
                entry[shown] = None  # no gap to recover on this metric (e.g. no exact match by either tier)
                continue
            summary = router_summary(scores, q_small, q_large, *charges[charge], cost_all_large)
            fraction, pgr, cost = summary.pop("_curves")
            spread = _bootstrap(resamples, scores, q_small, q_large, charges[charge])
            summary.update(spread)
            if time_charges is not None:
                timed = router_summary(scores, q_small, q_large, *time_charges[charge],
                                       float(time_charges["none"][1].sum()))
                summary.update({"time_cpt50": timed["cost_cpt50"], "time_cpt80": timed["cost_cpt80"]})
            summary["curve"] = {"large_fraction": [round(float(x), 4) for x in torch.linspace(0, 1, CURVE_POINTS)],
                                "pgr": _resample_points(fraction, pgr),
                                "cost_fraction": _resample_points(fraction, cost)}
            if shown == metric:
                curves[name] = (fraction, pgr, cost)
            entry[shown] = summary
        entry["charge"] = charges_doc(routers.get(name, (None, "none"))[1])
        fitted = entry[metric] or {}
        for key in ("apgr", "apgr_std", "cpt50", "cpt80", "cost_cpt50", "cost_cpt80", "time_cpt50", "time_cpt80"):
            entry[key] = fitted.get(key)  # the summary columns: on `metric`
        entry["auc"] = roc_auc(routers[name][0], labels) if name in routers else None
        results[name] = entry

    return results, curves


def evaluate_cascade(small: PathLike, large: PathLike, output: PathLike, *, data: Optional[PathLike] = None,
                     num_queries: int = 1024, calibration_queries: int = 2048, prompt_tokens: int = 32,
                     continuation_tokens: int = 16,
                     line_tokens: int = 32, margin: Optional[float] = None, l2: float = 1e-2, bootstrap: int = 200,
                     batch_size: int = 8, seed: int = 0, device: Optional[str] = None,
                     distilled: Optional[PathLike] = None, timing_queries: int = 64, metric: str = "loglik",
                     verbose: bool = True) -> dict[str, Any]:
    """Measures every router of NOTE 4 on the test queries; writes cascade_eval.json and cascade_eval.png.

    Args:
        small, large: checkpoint directories of `moe.train` (same tokenizer).
        output: directory for the report (created).
        data: the prepared data; default the small run's data.output.
        num_queries: test queries at most (from the validation split).
        calibration_queries: calibration queries at most (from the calibration
            split), to fit the learned routers and choose signal directions.
        prompt_tokens: K, the longest prompt (prompts have K/2..K tokens).
        continuation_tokens: reference tokens scored by `loglik`.
        line_tokens: the longest next line `exact_match` compares.
        margin: the learned router's label margin (nats/token); default the
            calibration set's median gain.
        l2: penalty of both learned routers.
        bootstrap: resamples of the test set for the spread (0: none).
        batch_size: sequences per forward pass and per decoding batch.
        seed: query lengths, bootstrap resamples.
        device: default cuda when available.
        distilled: a third checkpoint with the pair's tokenizer (a small tier
            trained with `trainer.distill`), scored alone on the test queries:
            a point on the quality-cost frontier beside the routers.
        timing_queries: test queries answered one at a time by each tier to
            measure wall time per query (NOTE 7); 0: no timing.
        metric: `loglik` or `next_token`: what the routers are fitted on and
            the summary columns report (NOTE 2).
        verbose: print the table.
    Returns:
        The report, as written to cascade_eval.json.
    Raises:
        ValueError: a bad option (named), different tokenizers (both files
            named), data of another tokenizer, too few documents or queries,
            or a large tier that is not better than the small one.
    """
    _check_options(num_queries=num_queries, calibration_queries=calibration_queries, prompt_tokens=prompt_tokens,
                   timing_queries=timing_queries, continuation_tokens=continuation_tokens, line_tokens=line_tokens,
                   margin=margin, l2=l2, bootstrap=bootstrap, batch_size=batch_size, metric=metric)
    small, large, output = Path(small), Path(large), Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output: {output} exists and is not a directory")
    tokenizer_sha256, data_dir = check_pair_and_data(small, large, data)
    if distilled is not None:
        check_pair_and_data(small, Path(distilled), data_dir)
        distilled = Path(distilled)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference_tokens = max(continuation_tokens, line_tokens)
    small_model, large_model = load_tiers(small, large, device, prompt_tokens, reference_tokens)

    # 1. Queries and what both tiers score on them: the small tier's features, both tiers' quality (NOTE 1, 2).
    sets, documents, calibration_documents = _query_sets(data_dir, prompt_tokens, reference_tokens, seed,
                                                         calibration_queries, num_queries)
    # Every layer of the small tier, both poolings: the probe's candidates are subsets (NOTE 4).
    full = HiddenFeatures(tuple(range(small_model.config.num_layers)), POOLINGS, small_model.config.hidden_size)
    measured = {name: _measure(small_model, large_model, pairs, full, continuation_tokens, batch_size)
                for name, pairs in sets.items()}
    cal, test = measured["calibration"], measured["test"]
    _check_gap(test, small, large)
    test_pairs = sets["test"]
    prompts = [query for query, _ in test_pairs]
    lines = _tier_lines(small_model, large_model, small, large, sets, test, line_tokens, batch_size, device)

    # 2. Costs per test query, in FLOPs and in measured seconds (NOTE 5, 7).
    costs = _Costs.of(small_model.config, large_model.config, prompts, lines)
    # 3. Routers (NOTE 4): scores on the test queries, fitted on the calibration queries' gain on `metric` only.
    routers, fitted = _fit_routers(cal, test, full, calibration_documents, lines.calibration, lines.small,
                                   lines.confidence, metric, margin, l2, seed)
    seconds = (measure_seconds(small_model, large_model, small, large, prompts[:timing_queries], line_tokens,
                               fitted["probe"].hidden, device) if timing_queries > 0 else None)
    # 4. Every router's APGR, CPT and curves on every metric.
    test_gain = test[f"{metric}_large"] - test[f"{metric}_small"]
    results, curves = _summarize_routers(routers, _oracle_scores(test), test, costs.charges(),
                                         None if seconds is None else _time_charges(seconds, len(prompts)),
                                         costs.all_large, metric, bootstrap, seed, test_gain > fitted["margin"])

    settings = {"num_queries": num_queries, "calibration_queries": calibration_queries,
                "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens,
                "line_tokens": line_tokens, "margin": fitted["margin"], "l2": l2, "bootstrap": bootstrap,
                "seed": seed, "metric": metric}
    alone = (None if distilled is None else
             _alone(distilled, [(q, r[:continuation_tokens]) for q, r in test_pairs],
                    [len(a.token_ids) for a in lines.small], test, batch_size, device, costs.all_large))
    report = {"small": str(small.resolve()), "large": str(large.resolve()), "data": str(data_dir.resolve()),
              "tokenizer_sha256": tokenizer_sha256, "settings": settings,
              "num_calibration": len(sets["calibration"]), "num_test": len(test_pairs),
              # Every document read has a first window, and the first turn takes them all (make_queries).
              "documents": {name: min(len(documents[name]), len(pairs)) for name, pairs in sets.items()},
              "tiers": _tier_entries({"small": (small, small_model.config), "large": (large, large_model.config)},
                                     test, costs, lines),
              "router_prefill_flops_per_query": float(costs.router_prefill.mean()),
              "seconds_per_query": seconds, "distilled": alone,
              **_fitted_entries(fitted, test, test_gain),
              "routers": results,
              "test_queries": _test_query_entries(prompts, test, lines.confidence)}
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "cascade_eval.json", report)
    plot_curves(curves, report, output / "cascade_eval.png")
    if verbose:
        print(format_report(report, output))
    return report


def _check_gap(test: dict[str, torch.Tensor], small: Path, large: Path) -> None:
    gap = float(test["loglik_large"].mean() - test["loglik_small"].mean())
    if not gap > 0:
        raise ValueError(f"large: {large} is not better than small ({small}) on the {len(test['loglik_small'])} "
                         f"test queries (mean loglik gap {gap:.4f} nats/token): there is no gap for a router to "
                         f"recover")


@dataclass
class _Lines:
    """Greedy next lines: both tiers' on the test queries, the small tier's on the calibration queries."""

    small: list
    large: list
    calibration: list

    def __post_init__(self) -> None:
        # The small tier's mean token confidence per test query (the post-hoc router's signal).
        self.confidence = torch.tensor([a.mean_confidence for a in self.small], dtype=torch.float64)


def _tier_lines(small_model: MoETransformer, large_model: MoETransformer, small: Path, large: Path,
                sets: dict[str, list], test: dict[str, torch.Tensor], line_tokens: int, batch_size: int,
                device: str) -> _Lines:
    """Both tiers' greedy next lines; adds each tier's exact match with the reference line to `test` (NOTE 2)."""
    prompts = [query for query, _ in sets["test"]]
    answers_small, generator = tier_answers(small_model, small, prompts, line_tokens, batch_size, device)
    answers_large, _ = tier_answers(large_model, large, prompts, line_tokens, batch_size, device)
    reference_lines = [next_line(generator.decode(reference)) for _, reference in sets["test"]]
    for tier, answers in (("small", answers_small), ("large", answers_large)):
        test[f"exact_match_{tier}"] = torch.tensor([float(a.text == line) for a, line in
                                                    zip(answers, reference_lines)], dtype=torch.float64)
    calibration, _ = tier_answers(small_model, small, [query for query, _ in sets["calibration"]], line_tokens,
                                  batch_size, device)
    return _Lines(answers_small, answers_large, calibration)


@dataclass
class _Costs:
    """Forward FLOPs per test query (NOTE 5): the router's prefill of the small tier, each tier's answer."""

    router_prefill: torch.Tensor
    answer_small: torch.Tensor
    answer_large: torch.Tensor

    @classmethod
    def of(cls, small: ModelConfig, large: ModelConfig, prompts: list[list[int]], lines: _Lines) -> "_Costs":
        def answers(config: ModelConfig, completions: list) -> torch.Tensor:
            return torch.tensor([answer_flops(config, len(p), len(a.token_ids)) for p, a in zip(prompts, completions)],
                                dtype=torch.float64)

        prefill = torch.tensor([forward_flops(small, len(p)) for p in prompts], dtype=torch.float64)
        return cls(prefill, answers(small, lines.small), answers(large, lines.large))

    @property
    def all_large(self) -> float:
        return float(self.answer_large.sum())

    def charges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per charge: (cost when kept on small, cost when sent to large)."""
        return {"none": (self.answer_small, self.answer_large),
                "prefill": (self.answer_small, self.router_prefill + self.answer_large),
                "posthoc": (self.answer_small, self.answer_small + self.answer_large)}


def _time_charges(seconds: dict[str, Any], n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The charges of `_Costs` in measured seconds per query, the same for every query."""
    ones = torch.ones(n, dtype=torch.float64)
    t_small, t_large, t_prefill = (seconds[k] * ones for k in ("small", "large", "router_prefill"))
    return {"none": (t_small, t_large), "prefill": (t_small, t_prefill + t_large),
            "posthoc": (t_small, t_small + t_large)}


def _oracle_scores(test: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle's score per metric: the large tier's gain, a binary metric's ties broken by the loglik gain."""
    loglik_gain = test["loglik_large"] - test["loglik_small"]
    return {"loglik": loglik_gain,
            "exact_match": test["exact_match_large"] - test["exact_match_small"] + 1e-3 * loglik_gain,
            "next_token": test["next_token_large"] - test["next_token_small"] + 1e-3 * loglik_gain}


def _tier_entries(tiers: dict[str, tuple[Path, ModelConfig]], test: dict[str, torch.Tensor], costs: _Costs,
                  lines: _Lines) -> dict[str, Any]:
    """The report's entry of each tier answering every test query alone."""
    flops = {"small": costs.answer_small, "large": costs.answer_large}
    answers = {"small": lines.small, "large": lines.large}
    return {tier: {"checkpoint": str(path.resolve()), "active_params": count_parameters(cfg)["active"],
                   "loglik": float(test[f"loglik_{tier}"].mean()),
                   "exact_match": float(test[f"exact_match_{tier}"].mean()),
                   "next_token": float(test[f"next_token_{tier}"].mean()),
                   "flops_per_query": float(flops[tier].mean()),
                   "mean_answer_tokens": sum(len(a.token_ids) for a in answers[tier]) / len(answers[tier])}
            for tier, (path, cfg) in tiers.items()}


def _fitted_entries(fitted: dict[str, Any], test: dict[str, torch.Tensor],
                    test_gain: torch.Tensor) -> dict[str, Any]:
    """The report's entries of the fitted routers and of each signal's rank correlation with the test gain."""
    learned, ridge = fitted["learned"], fitted["ridge"]
    return {"learned": {"weights": dict(zip(SIGNAL_NAMES, learned.weights)), "bias": learned.bias,
                        "regression_weights": dict(zip(SIGNAL_NAMES, ridge["weights"])),
                        "signal_directions": fitted["directions"],
                        "calibration_label_rate": float(fitted["labels"].mean())},
            "probe": fitted["probe_report"],
            "deferral": fitted["deferral_report"],
            "gain_correlation": {name: _pearson(_ranks(test["signals"][:, i]), _ranks(test_gain))
                                 for i, name in enumerate(SIGNAL_NAMES)}}


def _test_query_entries(prompts: list[list[int]], test: dict[str, torch.Tensor],
                        confidence: torch.Tensor) -> list[dict[str, Any]]:
    return [{"prompt_tokens": len(prompts[i]), "loglik_small": float(test["loglik_small"][i]),
             "loglik_large": float(test["loglik_large"][i]), "exact_match_small": int(test["exact_match_small"][i]),
             "exact_match_large": int(test["exact_match_large"][i]), "confidence_small": float(confidence[i]),
             "next_token_small": int(test["next_token_small"][i]), "next_token_large": int(test["next_token_large"][i]),
             "signals": dict(zip(SIGNAL_NAMES, test["signals"][i].tolist()))}
            for i in range(len(prompts))]


@torch.no_grad()
def measure_seconds(small_model: MoETransformer, large_model: MoETransformer, small: Path, large: Path,
                    prompts: list[list[int]], line_tokens: int, hidden: Optional[HiddenFeatures],
                    device: str) -> dict[str, Any]:
    """Mean wall seconds per query, one query at a time, of the small and the large tier's greedy answer and
    of the router's prefill of the small tier (NOTE 7); the three interleaved query by query."""
    import time

    from moe.generate import Generator, SamplingParams, load_tokenizer

    generators = {tier: Generator(model, load_tokenizer(checkpoint), max_batch_size=1, device=device,
                                  prefill_memo=0)
                  for tier, model, checkpoint in (("small", small_model, small), ("large", large_model, large))}
    params = [SamplingParams(max_tokens=line_tokens, stop=("\n",))]
    steps = {"small": lambda p: generators["small"].generate_ids([p], params),
             "large": lambda p: generators["large"].generate_ids([p], params),
             "router_prefill": lambda p: generators["small"].prefill_signals([p], hidden)}
    totals = dict.fromkeys(steps, 0.0)
    steps["small"](prompts[0])  # warm-up
    for prompt in prompts:
        for name, step in steps.items():
            started = time.perf_counter()
            step(prompt)
            totals[name] += time.perf_counter() - started
    return {**{name: total / len(prompts) for name, total in totals.items()}, "queries": len(prompts),
            "threads": torch.get_num_threads(), "device": device}


def _alone(checkpoint: Path, pairs: list[tuple[list[int], list[int]]], answer_lengths: list[int],
           test: dict[str, torch.Tensor], batch_size: int, device: str, cost_all_large: float) -> dict[str, Any]:
    """One more model answering every test query alone: its loglik and next-token accuracy, the share of the
    pair's gap it recovers on each, its forward FLOPs per query as a share of all-large (answers as long as the
    small tier's, NOTE 5)."""
    model = load_checkpoint(checkpoint, device=device).eval()
    loglik = -continuation_nll(model, pairs, batch_size)
    right = next_token_correct(model, pairs, batch_size)
    small, large = test["loglik_small"].mean(), test["loglik_large"].mean()
    nt_small, nt_large = test["next_token_small"].mean(), test["next_token_large"].mean()
    flops = sum(answer_flops(model.config, len(query), n) for (query, _), n in zip(pairs, answer_lengths))
    return {"checkpoint": str(checkpoint.resolve()), "loglik": float(loglik.mean()),
            "pgr": float((loglik.mean() - small) / (large - small)), "next_token": float(right.mean()),
            "next_token_pgr": float((right.mean() - nt_small) / (nt_large - nt_small)) if nt_large > nt_small
            else None, "cost_fraction": flops / cost_all_large,
            "active_params": count_parameters(model.config)["active"]}


def charges_doc(charge: str) -> str:
    return {"none": "no router cost", "prefill": "small prefill added to queries sent to large",
            "posthoc": "small answer on every query"}[charge]


def _bootstrap(resamples: list[torch.Tensor], scores: torch.Tensor, q_small: torch.Tensor, q_large: torch.Tensor,
               charge: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Optional[float]]:
    """Standard deviation of APGR and CPT over resamples of the test queries (NOTE 6)."""
    values: dict[str, list[float]] = {"apgr": [], "cpt50": [], "cpt80": []}
    for index in resamples:
        if not float(q_large[index].sum() - q_small[index].sum()) > 0:
            continue
        summary = router_summary(scores[index], q_small[index], q_large[index], charge[0][index], charge[1][index],
                                 float(charge[1][index].sum()))
        for key in values:
            if summary[key] is not None:
                values[key].append(summary[key])
    return {f"{key}_std": (float(torch.tensor(v, dtype=torch.float64).std()) if len(v) > 1 else None)
            for key, v in values.items()}


def plot_curves(curves: dict[str, tuple[torch.Tensor, ...]], report: dict[str, Any], path: Path) -> None:
    """PGR on the report's `metric` against the large-call and the cost fraction, one line per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["settings"]["metric"]
    figure, (by_calls, by_cost) = plt.subplots(1, 2, figsize=(12, 5))
    for name, (fraction, pgr, cost) in curves.items():
        style = {"random": dict(color="grey", linestyle="--"), "oracle": dict(color="black", linestyle=":")}.get(
            name, {})
        label = f"{name} (APGR {report['routers'][name]['apgr']:.3f})"
        by_calls.plot(fraction.numpy(), pgr.numpy(), label=label, linewidth=1.2, **style)
        by_cost.plot(cost.numpy(), pgr.numpy(), label=name, linewidth=1.2, **style)
    if report.get("distilled") is not None:  # a model answering alone: one point of cost and quality
        d = report["distilled"]
        by_cost.plot([d["cost_fraction"]], [d["pgr"]], marker="*", markersize=12, linestyle="none",
                     color="tab:red", label="distilled small alone")
        by_cost.legend(fontsize=7, loc="lower right")
    by_calls.set(xlabel="large-model calls (fraction of queries)", ylabel=f"performance gap recovered ({metric})",
                 title=f"{report['num_test']} test queries")
    by_cost.set(xlabel="FLOPs per query (fraction of all-large)", ylabel=f"performance gap recovered ({metric})",
                title="cost includes the router's own prefill")
    for axes in (by_calls, by_cost):
        axes.axhline(0.5, color="lightgrey", linewidth=0.8)
        axes.axhline(0.8, color="lightgrey", linewidth=0.8)
        axes.grid(alpha=0.3)
    by_calls.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def format_report(report: dict[str, Any], output: Path) -> str:
    """The printed table: one row per router."""
    tiers = report["tiers"]
    lines = [
        f"cascade evaluation: {report['num_test']} test queries ({report['documents']['test']} documents), router "
        f"fitted on {report['num_calibration']} calibration queries ({report['documents']['calibration']} other "
        f"documents)",
        f"small: loglik {tiers['small']['loglik']:.4f}, exact match {tiers['small']['exact_match']:.3f}, "
        f"next token {tiers['small']['next_token']:.3f}, {tiers['small']['flops_per_query'] / 1e9:.3f} GFLOP/query",
        f"large: loglik {tiers['large']['loglik']:.4f}, exact match {tiers['large']['exact_match']:.3f}, "
        f"next token {tiers['large']['next_token']:.3f}, {tiers['large']['flops_per_query'] / 1e9:.3f} GFLOP/query "
        f"| router prefill {report['router_prefill_flops_per_query'] / 1e9:.3f} GFLOP/query",
        f"routers fitted on, and columns APGR..time@80% on: {report['settings']['metric']}",
        f"{'router':<24} {'APGR':>13} {'CPT(50%)':>9} {'CPT(80%)':>9} {'cost@50%':>9} {'cost@80%':>9} "
        f"{'time@50%':>9} {'time@80%':>9} {'EM APGR':>8}",
    ]
    for name, entry in report["routers"].items():
        std = entry["apgr_std"]
        apgr = _fmt(entry["apgr"], ".3f") + ("" if std is None else f" ±{std:.3f}")
        em = entry["exact_match"]
        lines.append(f"{name:<24} {apgr:>13} {_fmt(entry['cpt50'], '.1%'):>9} {_fmt(entry['cpt80'], '.1%'):>9} "
                     f"{_fmt(entry['cost_cpt50'], '.1%'):>9} {_fmt(entry['cost_cpt80'], '.1%'):>9} "
                     f"{_fmt(entry.get('time_cpt50'), '.1%'):>9} {_fmt(entry.get('time_cpt80'), '.1%'):>9} "
                     f"{_fmt(em['apgr'] if em else None, '.3f'):>8}")
    if report["seconds_per_query"] is not None:
        t = report["seconds_per_query"]
        lines.append(f"wall time per query ({t['queries']} queries one at a time, {t['threads']} threads): small "
                     f"{t['small'] * 1e3:.1f} ms, large {t['large'] * 1e3:.1f} ms, router prefill "
                     f"{t['router_prefill'] * 1e3:.1f} ms")
    if report["distilled"] is not None:
        d = report["distilled"]
        lines.append(f"distilled small tier alone: loglik {d['loglik']:.4f}, {_fmt(d['pgr'], '.1%')} of the gap "
                     f"recovered; next token {d['next_token']:.3f}, {_fmt(d['next_token_pgr'], '.1%')} of its gap; "
                     f"at {_fmt(d['cost_fraction'], '.1%')} of the all-large FLOPs ({d['checkpoint']})")
    lines.append(f"wrote {output / 'cascade_eval.json'} and {output / 'cascade_eval.png'}")
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _check_options(**options: Any) -> None:
    check_positive_ints(options, "num_queries", "calibration_queries", "prompt_tokens", "continuation_tokens",
                        "line_tokens", "batch_size")
    timing = options["timing_queries"]
    if not isinstance(timing, int) or isinstance(timing, bool) or timing < 0:
        raise ValueError(f"timing_queries must be an integer >= 0, got {timing!r}")
    bootstrap = options["bootstrap"]
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    margin = options["margin"]
    if margin is not None and (not isinstance(margin, (int, float)) or not math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    l2 = options["l2"]
    if not isinstance(l2, (int, float)) or not math.isfinite(l2) or not l2 > 0:
        raise ValueError(f"l2 must be a positive number, got {l2!r}")
    if options["metric"] not in FIT_METRICS:
        raise ValueError(f"metric must be one of {list(FIT_METRICS)} (exact_match needs generated answers, which "
                         f"the calibration queries do not get), got {options['metric']!r}")


def main(argv: Optional[list[str]] = None) -> None:
    run(evaluate_cascade, argv, OPTIONS, REQUIRED, USAGE)


if __name__ == "__main__":
    main()
