"""How hard a prompt is for the cascade: pre-generation signals, a learned router, thresholds.

Shape legend: N prompts, F features, B batch, S positions (right-padded), V vocabulary,
E experts, D hidden size, L layers read.

    signals_NF = prompt_signals(small_model, prompt_ids)        # one prefill of the small model
    router = DifficultyRouter.fit(signals_NF, labels_N)          # labels: the large model was better
    router.threshold = threshold_for_large_fraction(router.score(signals_NF), 0.3)
    route_to_large = router.score(signals_NF) >= router.threshold

Pre-generation routing (RouteLLM): the router sees only the prompt, through
signals of the small model's prefill, and sends a query to one tier. Post-hoc
routing (FrugalGPT, AutoMix): the small model answers, and the query goes to
the large model when the answer's mean token confidence is low
(`escalate_posthoc`). Everything here is a plain function of tensors; the
calibration that fits and evaluates the router is `cascade.calibrate`.

A router may also read the small model's own prefill hidden states (a probe,
`HiddenFeatures`): the residual stream after chosen blocks, at the prompt's
last token and averaged over its tokens, appended to the signals
(`feature_row`). `fit_probe` fits it as a ridge regression of the large
tier's gain, its penalty chosen by cross-validation over whole documents.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from moe.model import MoETransformer

SIGNAL_NAMES = ("mean_nll", "max_nll", "mean_entropy", "prompt_tokens", "router_entropy", "next_confidence",
                "next_margin", "next_entropy")
POOLINGS = ("last", "mean")
ROUTER_FORMAT = "moe.difficulty_router"
ROUTER_VERSION = 1
_POSITION_CHUNK = 512  # positions per float64 log-softmax: bounds memory at 512 * V doubles

PathLike = Union[str, os.PathLike]


# ---- signals -----------------------------------------------------------------------------

def check_prompt_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raises ValueError naming `prompt` for an empty prompt or a token id outside the vocabulary."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt: no prompts given")
    for index, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt: prompt {index} has no tokens (at least one is needed)")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt: prompt {index} has token ids outside [0, {vocab_size})")


def right_pad(prompt_ids: Sequence[Sequence[int]], device: Union[str, torch.device],
              pad_id: int = 0) -> torch.Tensor:
    """(B, S) int64 ids, each prompt at positions 0..n-1 and `pad_id` after it.

    Right padding keeps every prompt at its own positions, and causal attention
    never lets a real token see the padding after it.
    """
    longest = max(len(ids) for ids in prompt_ids)
    out = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.int64)
    for row, ids in enumerate(prompt_ids):
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out.to(device)


@dataclass(frozen=True)
class HiddenFeatures:
    """Which prefill hidden states of the small model a router reads (a probe).

    Attributes:
        layers: block indices (0-based) whose output residual stream is read.
        pooling: per layer, in this order: `last` (the prompt's last token,
            the state the first answer token is predicted from) and/or `mean`
            (averaged over the prompt's tokens).
        hidden_size: the model's width, so a router cannot be applied to
            another model's states.
    """

    layers: tuple[int, ...]
    pooling: tuple[str, ...]
    hidden_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "pooling", tuple(self.pooling))
        if (not self.layers or len(set(self.layers)) != len(self.layers)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
            raise ValueError(f"HiddenFeatures.layers must be distinct block indices >= 0, got {list(self.layers)}")
        if not self.pooling or len(set(self.pooling)) != len(self.pooling) or any(
                p not in POOLINGS for p in self.pooling):
            raise ValueError(f"HiddenFeatures.pooling must be distinct names from {list(POOLINGS)}, "
                             f"got {list(self.pooling)}")
        if not isinstance(self.hidden_size, int) or isinstance(self.hidden_size, bool) or self.hidden_size <= 0:
            raise ValueError(f"HiddenFeatures.hidden_size must be a positive integer, got {self.hidden_size!r}")

    @property
    def width(self) -> int:
        """Feature columns: layers x pooling x hidden_size."""
        return len(self.layers) * len(self.pooling) * self.hidden_size

    def check_model(self, config: Any, what: str = "the small model") -> None:
        """Raises ValueError when `config` (a ModelConfig) is not the model these features were read from."""
        if config.hidden_size != self.hidden_size or max(self.layers) >= config.num_layers:
            raise ValueError(f"the router reads hidden states of layers {list(self.layers)} of width "
                             f"{self.hidden_size}, but {what} has {config.num_layers} layers of width "
                             f"{config.hidden_size}: calibrate the router for this model")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "pooling": list(self.pooling), "hidden_size": self.hidden_size}

    def columns_in(self, full: "HiddenFeatures") -> list[int]:
        """The positions of these features' columns among `full`'s hidden-state columns (0-based)."""
        if self.hidden_size != full.hidden_size or not (set(self.layers) <= set(full.layers)
                                                         and set(self.pooling) <= set(full.pooling)):
            raise ValueError(f"hidden features {self.to_dict()} are not a subset of {full.to_dict()}")
        columns, size = [], full.hidden_size
        for layer in self.layers:
            for pooling in self.pooling:
                block = full.layers.index(layer) * len(full.pooling) + full.pooling.index(pooling)
                columns += range(block * size, (block + 1) * size)
        return columns


def pooled_hidden(hidden_states: list[torch.Tensor], prompt_ids: Sequence[Sequence[int]],
                  features: HiddenFeatures) -> torch.Tensor:
    """The `features` columns of each right-padded prompt: (B, features.width) float64 on the CPU.

    Args:
        hidden_states: one (B, S, D) tensor per block (`MoEOutput.hidden_states`).
        prompt_ids: the prompts, row b holding prompt b at positions 0..n-1.
        features: which layers and poolings.
    """
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=hidden_states[0].device)
    positions = torch.arange(hidden_states[0].shape[1], device=lengths.device)
    keep_BS1 = (positions.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    rows = torch.arange(len(prompt_ids), device=lengths.device)
    parts = []
    for layer in features.layers:
        h_BSD = hidden_states[layer].to(torch.float64)
        for pooling in features.pooling:
            if pooling == "last":
                parts.append(h_BSD[rows, lengths - 1])
            else:
                parts.append((h_BSD * keep_BS1).sum(1) / lengths.unsqueeze(1))
    return torch.cat(parts, dim=1).cpu()


def signals_from_prefill(logits_BSV: torch.Tensor, router_probs: list[torch.Tensor],
                         prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The `SIGNAL_NAMES` of each prompt from one right-padded prefill.

    Per prompt of n tokens t_0..t_{n-1} (padding is never read):
        mean_nll, max_nll: of -log p(t_i | t_<i) for i = 1..n-1. t_0 has no
            prefix, so a 1-token prompt has no term: both are 0.
        mean_entropy: mean entropy (nats) of the next-token distributions at
            positions 0..n-1 (the last one is the first generated token's).
        prompt_tokens: n.
        router_entropy: entropy (nats) of each MoE router's distribution over
            experts, averaged over the prompt's tokens and the MoE layers
            (0 for a dense model): how unsure the model's routers are.
        next_confidence, next_margin, next_entropy: of the next-token
            distribution at the last position (the first answer token's): its
            top probability, top minus second probability, and entropy (nats).
            Where the small model is unsure of what comes next, a better model
            most often gets it right (docs/results/cascade_tiny_base.md).

    Args:
        logits_BSV: logits of the prefill, row b holding prompt b.
        router_probs: one (B, S, E) tensor per MoE layer (`MoEOutput.router_probs`).
        prompt_ids: the prompts.
    Returns:
        (B, len(SIGNAL_NAMES)) float64 on the CPU.
    """
    rows = []
    for b, ids in enumerate(prompt_ids):
        n = len(ids)
        targets = torch.tensor(ids[1:], dtype=torch.int64, device=logits_BSV.device)
        nll_parts, entropy_sum = [], 0.0
        for start in range(0, n, _POSITION_CHUNK):
            stop = min(n, start + _POSITION_CHUNK)
            logp_SV = torch.log_softmax(logits_BSV[b, start:stop].to(torch.float64), dim=-1)
            entropy_sum += float(torch.special.entr(logp_SV.exp()).sum())
            # Position i predicts t_{i+1}; the last prompt position has no target.
            chunk_targets = targets[start:stop]
            nll_parts.append(-logp_SV[:len(chunk_targets)].gather(1, chunk_targets.unsqueeze(1)).squeeze(1))
        nll = torch.cat(nll_parts)
        mean_nll = float(nll.mean()) if n > 1 else 0.0
        max_nll = float(nll.max()) if n > 1 else 0.0
        router_entropy = 0.0
        if router_probs:
            per_layer = [float(torch.special.entr(p[b, :n].to(torch.float64)).sum(-1).mean()) for p in router_probs]
            router_entropy = sum(per_layer) / len(per_layer)
        next_p = torch.softmax(logits_BSV[b, n - 1].to(torch.float64), dim=-1)
        top2 = next_p.topk(min(2, next_p.numel())).values
        next_margin = float(top2[0] - top2[1]) if top2.numel() == 2 else 1.0
        rows.append([mean_nll, max_nll, entropy_sum / n, float(n), router_entropy, float(top2[0]), next_margin,
                     float(torch.special.entr(next_p).sum())])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def prompt_signals(model: MoETransformer, prompt_ids: list[list[int]], *, batch_size: int = 8,
                   hidden: Optional[HiddenFeatures] = None) -> torch.Tensor:
    """The difficulty signals (`SIGNAL_NAMES`) of each prompt from one prefill of `model`.

    Prompts are batched (right-padded, similar lengths together) and routed
    dropless, so a prompt's signals do not depend on the other prompts or the
    padding. The model runs in eval mode (no router jitter) and is put back
    in its previous mode. See `signals_from_prefill` for the definitions;
    `moe.generate.Generator.prefill_signals` computes the same from the
    generator's own prefill.

    Args:
        model: the small model of the cascade.
        prompt_ids: N prompts of at least one token each.
        batch_size: prompts per forward pass.
        hidden: also these pooled hidden states (`pooled_hidden`), after the signals.
    Returns:
        (N, len(SIGNAL_NAMES) [+ hidden.width]) float64 on the CPU.
    """
    check_prompt_ids(prompt_ids, model.config.vocab_size)
    if hidden is not None:
        hidden.check_model(model.config)
    device = model.embed_tokens.weight.device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    width = len(SIGNAL_NAMES) + (hidden.width if hidden is not None else 0)
    out = torch.empty(len(prompt_ids), width, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            prompts = [prompt_ids[i] for i in chunk]
            result = model(right_pad(prompts, device), ignore_capacity=True, return_router_probs=True,
                           return_hidden_states=hidden is not None)
            out[chunk] = feature_row(result, prompts, hidden)
    finally:
        model.train(was_training)
    return out


def feature_row(prefill: Any, prompt_ids: Sequence[Sequence[int]],
                hidden: Optional[HiddenFeatures]) -> torch.Tensor:
    """`signals_from_prefill` of a prefill's `MoEOutput`, then its `pooled_hidden` columns when `hidden` is set."""
    signals = signals_from_prefill(prefill.logits, prefill.router_probs, prompt_ids)
    if hidden is None:
        return signals
    return torch.cat([signals, pooled_hidden(prefill.hidden_states, prompt_ids, hidden)], dim=1)


# ---- thresholds --------------------------------------------------------------------------

def _check_fraction(fraction: float, name: str = "fraction") -> None:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {fraction!r}")


def _as_scores(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
    if scores.numel() == 0:
        raise ValueError(f"{name}: at least one value is needed")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name}: values must be finite")
    return scores


def threshold_for_count(scores: torch.Tensor, count: int) -> float:
    """A threshold t with at most `count` (exactly, without ties at the cut) of `scores` >= t.

    Between two scores the threshold is their midpoint, so a new query
    scoring like its calibration neighbours is not pushed to one side.
    """
    descending = _as_scores(scores).sort(descending=True).values.tolist()
    n = len(descending)
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}], got {count}")
    if count == 0:
        return math.nextafter(descending[0], math.inf)
    if count == n:
        return descending[-1]
    above, below = descending[count - 1], descending[count]
    threshold = (above + below) / 2
    if threshold <= below:  # equal, or adjacent floats: the midpoint rounds onto `below`
        threshold = math.nextafter(below, math.inf)
    return threshold


def threshold_for_large_fraction(scores: torch.Tensor, fraction: float) -> float:
    """The score threshold that sends `fraction` of a calibration set to the large model (RouteLLM).

    Args:
        scores: router scores of the calibration queries.
        fraction: in [0, 1]; round(fraction * N) queries score >= the threshold
            (fewer when scores tie at the cut).
    Returns:
        The threshold; route to large when score >= threshold.
    """
    _check_fraction(fraction)
    scores = _as_scores(scores)
    return threshold_for_count(scores, round(fraction * scores.numel()))


def threshold_for_budget(scores: torch.Tensor, cost_small: float, cost_large: float, budget: float) -> float:
    """The threshold of the largest large-model fraction whose mean cost per query fits `budget`.

    Cost model (pre-generation routing): each query is answered by exactly one
    tier and costs that tier's cost per query, so sending a fraction f to the
    large model costs (1 - f) * cost_small + f * cost_large on average. The
    small model's prefill for the routing signals is not counted (fold it into
    cost_small and cost_large if it matters).

    Args:
        scores: router scores of the calibration queries.
        cost_small, cost_large: cost per query of each tier (any unit).
        budget: allowed mean cost per query, in the same unit.
    Returns:
        The threshold (route to large when score >= threshold); on `scores`
        the realised mean cost is <= budget, and one more large query would
        exceed it.
    Raises:
        ValueError: a negative or non-finite cost, or a budget below
            cost_small (not even all-small fits).
    """
    for name, value in (("cost_small", cost_small), ("cost_large", cost_large), ("budget", budget)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    scores = _as_scores(scores)
    n = scores.numel()
    if budget < cost_small:
        raise ValueError(f"budget {budget} is below cost_small {cost_small}: not even all-small routing fits")
    if cost_large <= cost_small:
        return threshold_for_count(scores, n)  # the large model is no dearer: always use it
    # The largest k with cost_small + k / n * (cost_large - cost_small) <= budget, guarded against rounding.
    k = min(n, math.floor((budget - cost_small) / (cost_large - cost_small) * n + 1e-9))
    while k > 0 and cost_small + k / n * (cost_large - cost_small) > budget:
        k -= 1
    return threshold_for_count(scores, k)


def large_fraction_for_budget(cost_small: float, cost_large: float, budget: float) -> float:
    """The largest fraction of large-model calls whose mean cost per query fits `budget`.

    The cost model of `threshold_for_budget`: (1 - f) * cost_small + f * cost_large <= budget.
    A budget below cost_small raises ValueError; one at or above cost_large gives 1.
    """
    for name, value in (("cost_small", cost_small), ("cost_large", cost_large), ("budget", budget)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    if budget < cost_small:
        raise ValueError(f"budget {budget} is below cost_small {cost_small}: not even all-small routing fits")
    if cost_large <= cost_small:
        return 1.0
    return min(1.0, (budget - cost_small) / (cost_large - cost_small))


def confidence_threshold_for_escalation(confidences: torch.Tensor, fraction: float) -> float:
    """The post-hoc confidence threshold that escalates `fraction` of a calibration set.

    Args:
        confidences: the small model's answer confidences (`Completion.mean_confidence`).
        fraction: in [0, 1]; round(fraction * N) answers have confidence < the
            threshold (fewer when confidences tie at the cut).
    Returns:
        t for `escalate_posthoc(confidence, t)`.
    """
    _check_fraction(fraction)
    confidences = _as_scores(confidences, "confidences")
    k = round(fraction * confidences.numel())
    # confidence < t  <=>  -confidence > -t: the same cut on negated values, strict side.
    ascending = confidences.sort().values.tolist()
    n = len(ascending)
    if k == 0:
        return ascending[0]
    if k == n:
        return math.nextafter(ascending[-1], math.inf)
    below, above = ascending[k - 1], ascending[k]
    threshold = (below + above) / 2
    if threshold <= below:
        threshold = above
    return threshold


def escalate_posthoc(completion_confidence: float, threshold: float) -> bool:
    """FrugalGPT/AutoMix post-hoc cascade: ask the large model when the small model's
    answer has mean token confidence below `threshold`.

    Args:
        completion_confidence: `Completion.mean_confidence` of the small model's answer.
        threshold: e.g. `DifficultyRouter.posthoc_threshold`.
    """
    for name, value in (("completion_confidence", completion_confidence), ("threshold", threshold)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return completion_confidence < threshold


def tier_for_score(scores: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Cascades of more than two tiers: the tier index of each score.

    Args:
        scores: router scores (N,).
        thresholds: one non-decreasing threshold per tier boundary (T - 1 for
            T tiers, cheapest first).
    Returns:
        (N,) int64: the number of thresholds <= score (0 = the cheapest tier).
    """
    bounds = torch.tensor(list(thresholds), dtype=torch.float64)
    if bounds.numel() and not bool((bounds[1:] >= bounds[:-1]).all()):
        raise ValueError(f"thresholds must be non-decreasing, got {list(thresholds)}")
    return torch.searchsorted(bounds, _as_scores(scores), right=True)


def _interpolate(table: list[list[float]], fraction: float, what: str) -> float:
    if not table:
        raise ValueError(f"this router has no {what} table (it was not calibrated by cascade.calibrate)")
    _check_fraction(fraction)
    fractions = [row[0] for row in table]
    if fraction <= fractions[0]:
        return table[0][1]
    for (f0, t0), (f1, t1) in zip(table, table[1:]):
        if fraction <= f1:
            return t0 + (t1 - t0) * (fraction - f0) / (f1 - f0)
    return table[-1][1]


# ---- the learned router ------------------------------------------------------------------

def _fit_logistic(x_NF: torch.Tensor, y_N: torch.Tensor, l2: float, max_iter: int = 100,
                  tolerance: float = 1e-10) -> tuple[torch.Tensor, float]:
    """Minimises mean log-loss + l2 / 2 * |w|^2 (bias not penalised) by damped Newton steps, in float64."""
    num, num_features = x_NF.shape
    a_NP = torch.cat([x_NF, torch.ones(num, 1, dtype=torch.float64)], dim=1)
    penalty_P = torch.full((num_features + 1,), l2, dtype=torch.float64)
    penalty_P[-1] = 0.0
    theta_P = torch.zeros(num_features + 1, dtype=torch.float64)

    def objective(theta: torch.Tensor) -> float:
        logits = a_NP @ theta
        loss = (torch.logaddexp(torch.zeros_like(logits), logits) - y_N * logits).mean()
        return float(loss + 0.5 * (penalty_P * theta.square()).sum())

    for _ in range(max_iter):
        p_N = torch.sigmoid(a_NP @ theta_P)
        grad_P = a_NP.T @ (p_N - y_N) / num + penalty_P * theta_P
        if float(grad_P.abs().max()) < tolerance:
            break
        hessian_PP = (a_NP.T * (p_N * (1 - p_N))) @ a_NP / num + torch.diag(penalty_P)
        step_P = torch.linalg.solve(hessian_PP, grad_P)
        # Backtracking keeps every step a descent step far from the optimum.
        current, scale = objective(theta_P), 1.0
        slack = 1e-15 * abs(current)  # rounding: near the optimum the objective no longer moves
        while (objective(theta_P - scale * step_P) > current - 1e-4 * scale * float(grad_P @ step_P) + slack
               and scale > 1e-8):
            scale /= 2
        theta_P = theta_P - scale * step_P
    return theta_P[:-1], float(theta_P[-1])


@dataclass
class DifficultyRouter:
    """Logistic regression on standardised signals: P(the large model answers better).

    Attributes:
        signal_names: the signals used, a subset of `SIGNAL_NAMES`. Every
            method takes full `prompt_signals` rows and picks these columns.
        mean, std: standardisation of each used feature (the signals, then
            the hidden columns).
        weights, bias: the logistic model on standardised features.
        threshold: route to large when score >= threshold.
        fraction_thresholds: [large fraction, threshold] rows, fractions
            ascending, from the calibration set's scores (`threshold_for_fraction`).
        posthoc_threshold: the calibrated confidence threshold of post-hoc
            escalation (`escalate_posthoc`), None if not calibrated.
        posthoc_fraction_thresholds: [escalated fraction, confidence threshold] rows.
        metadata: free-form facts about the calibration (checkpoints, data, sizes).
        hidden: the small model's pooled hidden states the router also reads
            (a probe), or None; rows then carry `hidden.width` more columns
            (`prompt_signals(..., hidden=router.hidden)`).
        deferral: the token-level post-hoc rule (`DeferralRule`), or None:
            post-hoc routing then escalates on the mean token confidence.
    """

    signal_names: tuple[str, ...]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float = 0.5
    fraction_thresholds: list[list[float]] = field(default_factory=list)
    posthoc_threshold: Optional[float] = None
    posthoc_fraction_thresholds: list[list[float]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    hidden: Optional[HiddenFeatures] = None
    deferral: Optional["DeferralRule"] = None

    def __post_init__(self) -> None:
        self.deferral = _nested(self.deferral, DeferralRule, "DifficultyRouter.deferral")
        self.hidden = _nested(self.hidden, HiddenFeatures, "DifficultyRouter.hidden")
        self.signal_names = tuple(self.signal_names)
        unknown = [n for n in self.signal_names if n not in SIGNAL_NAMES]
        if not self.signal_names or unknown or len(set(self.signal_names)) != len(self.signal_names):
            raise ValueError(f"DifficultyRouter.signal_names must be distinct names from {list(SIGNAL_NAMES)}, "
                             f"got {list(self.signal_names)}")
        _check_linear_model(self, "DifficultyRouter", len(self.signal_names) + self.hidden_width, "one per feature")
        if self.posthoc_threshold is not None and not _is_finite_number(self.posthoc_threshold):
            raise ValueError(f"DifficultyRouter.posthoc_threshold must be a finite number or null, "
                             f"got {self.posthoc_threshold!r}")
        for name in ("fraction_thresholds", "posthoc_fraction_thresholds"):
            _check_table(getattr(self, name), f"DifficultyRouter.{name}", increasing=name.startswith("posthoc"))
            setattr(self, name, [[float(f), float(t)] for f, t in getattr(self, name)])
        if not isinstance(self.metadata, dict):
            raise ValueError(f"DifficultyRouter.metadata must be an object, got {self.metadata!r}")

    @classmethod
    def fit(cls, signals: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, *,
            signal_names: Sequence[str] = SIGNAL_NAMES) -> "DifficultyRouter":
        """Fits the logistic regression (damped Newton, float64, L2 on the weights).

        Args:
            signals: (N, len(SIGNAL_NAMES)) rows of `prompt_signals`.
            labels: (N,) 1 where the large model was better, else 0.
            l2: penalty on the standardised weights (> 0: a unique optimum
                even for separable labels).
            signal_names: which signals to use.
        Returns:
            The router, threshold 0.5 (set it with the threshold functions).
        """
        if not isinstance(l2, (int, float)) or not l2 > 0 or not math.isfinite(l2):
            raise ValueError(f"l2 must be a positive number, got {l2!r}")
        names = tuple(signal_names)
        if not names or any(n not in SIGNAL_NAMES for n in names) or len(set(names)) != len(names):
            raise ValueError(f"signal_names must be distinct names from {list(SIGNAL_NAMES)}, got {list(names)}")
        x_NF = _columns(signals, names)
        y_N = torch.as_tensor(labels).to(torch.float64).reshape(-1).cpu()
        if y_N.numel() != x_NF.shape[0]:
            raise ValueError(f"labels: {y_N.numel()} labels for {x_NF.shape[0]} signal rows")
        if not bool(((y_N == 0) | (y_N == 1)).all()):
            raise ValueError("labels must be 0 or 1")
        if float(y_N.min()) == float(y_N.max()):
            raise ValueError(f"labels are all {int(y_N[0])}: both classes are needed to fit a router")
        mean_F = x_NF.mean(0)
        std_F = x_NF.std(0, unbiased=False)
        std_F = torch.where(std_F > 1e-12, std_F, torch.ones_like(std_F))  # a constant signal stays 0
        weights_F, bias = _fit_logistic((x_NF - mean_F) / std_F, y_N, float(l2))
        return cls(names, mean_F.tolist(), std_F.tolist(), weights_F.tolist(), bias)

    @property
    def hidden_width(self) -> int:
        """Hidden-state columns after the signals in the rows this router reads (0 without a probe)."""
        return self.hidden.width if self.hidden is not None else 0

    def score(self, signals: torch.Tensor) -> torch.Tensor:
        """P(large is better) (N,) float64 for (N, len(SIGNAL_NAMES) + hidden_width) `prompt_signals` rows."""
        x_NF = _columns(signals, self.signal_names, self.hidden_width)
        z_NF = (x_NF - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
        return torch.sigmoid(z_NF @ torch.tensor(self.weights, dtype=torch.float64) + self.bias)

    def threshold_for_fraction(self, fraction: float) -> float:
        """The score threshold sending `fraction` of the calibration queries to large (interpolated)."""
        return _interpolate(self.fraction_thresholds, fraction, "fraction_thresholds")

    def posthoc_threshold_for_fraction(self, fraction: float) -> float:
        """The confidence threshold escalating `fraction` of the calibration answers (interpolated)."""
        return _interpolate(self.posthoc_fraction_thresholds, fraction, "posthoc_fraction_thresholds")

    def save(self, path: PathLike) -> None:
        """Writes the router as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        payload = {"format": ROUTER_FORMAT, "version": ROUTER_VERSION, **asdict(self)}
        payload["signal_names"] = list(self.signal_names)
        payload["hidden"] = self.hidden.to_dict() if self.hidden is not None else None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: PathLike) -> "DifficultyRouter":
        """Reads a router written by `save`, validating every field.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not JSON, another format or version, a missing or
                unknown field, or a bad value; the message names the file and field.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"router file {path} does not exist (write one with python -m cascade.calibrate)")
        try:
            payload = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"router file {path} is not valid JSON ({err})") from None
        if not isinstance(payload, dict):
            raise ValueError(f"router file {path} must hold a JSON object")
        if payload.get("format") != ROUTER_FORMAT or payload.get("version") != ROUTER_VERSION:
            raise ValueError(f"router file {path}: field 'format'/'version' must be {ROUTER_FORMAT!r} version "
                             f"{ROUTER_VERSION}, got {payload.get('format')!r} version {payload.get('version')!r}")
        known = {f.name for f in fields(cls)}
        body = {k: v for k, v in payload.items() if k not in ("format", "version")}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"router file {path}: unknown field(s) {unknown}")
        required = ("signal_names", "mean", "std", "weights", "bias")
        missing = [name for name in required if name not in body]
        if missing:
            raise ValueError(f"router file {path}: missing field(s) {missing}")
        if not isinstance(body["signal_names"], list) or not all(isinstance(n, str) for n in body["signal_names"]):
            raise ValueError(f"router file {path}: field 'signal_names' must be a list of names")
        try:
            return cls(**body)
        except ValueError as err:
            raise ValueError(f"router file {path}: {err}") from None


# ---- the hidden-state probe -------------------------------------------------------------

PROBE_L2_GRID = tuple(10.0 ** e for e in range(-3, 4))  # penalties tried, on standardised features


def routing_apgr(scores: torch.Tensor, gain: torch.Tensor) -> float:
    """Area under the share of the total gain recovered when the highest-scoring queries go to large first.

    RouteLLM's APGR for a routing order (random: 0.5 in expectation); NaN when
    the total gain is not positive. Ties are taken in index order: use it on
    continuous scores (the cross-validation below), `cascade.evaluate` for reports.
    """
    gain = torch.as_tensor(gain, dtype=torch.float64).reshape(-1)
    total = float(gain.sum())
    if not total > 0:
        return math.nan
    order = torch.argsort(torch.as_tensor(scores, dtype=torch.float64).reshape(-1), descending=True, stable=True)
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), gain[order].cumsum(0)]) / total
    return float(((curve[1:] + curve[:-1]) / 2).mean())


def _ridge_path(x_NF: torch.Tensor, y_N: torch.Tensor, l2_grid: Sequence[float]) -> list[tuple[torch.Tensor, float]]:
    """(weights, bias) minimising mean squared error + l2 * |w|^2 for each l2, from one eigendecomposition."""
    mean_F, mean_y = x_NF.mean(0), y_N.mean()
    xc_NF = x_NF - mean_F
    gram_FF = xc_NF.T @ xc_NF / len(y_N)
    eigenvalues, vectors = torch.linalg.eigh(gram_FF)
    projected = vectors.T @ (xc_NF.T @ (y_N - mean_y) / len(y_N))
    path = []
    for l2 in l2_grid:
        w_F = vectors @ (projected / (eigenvalues.clamp_min(0) + l2))
        path.append((w_F, float(mean_y - mean_F @ w_F)))
    return path


def _standardise(x_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean_F = x_NF.mean(0)
    std_F = x_NF.std(0, unbiased=False)
    return mean_F, torch.where(std_F > 1e-12, std_F, torch.ones_like(std_F))


def cross_validated_ridge(x_all: torch.Tensor, gain: torch.Tensor, groups: Sequence[int],
                          candidates: Sequence[Sequence[int]], *, l2_grid: Sequence[float] = PROBE_L2_GRID,
                          folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Ridge regressions of the gain on column subsets, scored by out-of-fold routing over whole documents.

    Queries are split into `folds` folds by document (all of a document's
    queries in one fold, so no text is both fitted and scored); each
    (candidate, l2) predicts every query from the other folds, and the pair
    whose out-of-fold predictions route best (`routing_apgr`) wins.

    Returns:
        {"candidate": index, "l2", "cv_apgr", "columns", "out_of_fold": (N,) predictions of the winner,
         "results": [(candidate index, l2, cv_apgr), ...]}.
    """
    x_all = torch.as_tensor(x_all, dtype=torch.float64).cpu()
    y_N = torch.as_tensor(gain, dtype=torch.float64).reshape(-1).cpu()
    group_N = torch.as_tensor(list(groups), dtype=torch.int64)
    documents = torch.unique(group_N)
    if x_all.dim() != 2 or x_all.shape[0] != len(y_N) or len(group_N) != len(y_N):
        raise ValueError(f"features, gain and groups must describe the same {len(y_N)} queries, got features "
                         f"{tuple(x_all.shape)} and {len(group_N)} groups")
    if not isinstance(folds, int) or not 2 <= folds <= len(documents):
        raise ValueError(f"folds must be in [2, {len(documents)}] (the number of documents), got {folds}")
    if not candidates:
        raise ValueError("candidates: at least one feature set is needed")
    shuffled = documents[torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed))]
    fold_of_document = {int(d): i % folds for i, d in enumerate(shuffled)}
    fold_N = torch.tensor([fold_of_document[int(g)] for g in group_N])
    results, best = [], None
    for candidate, columns in enumerate(candidates):
        x_NF = x_all[:, list(columns)]
        out_of_fold = torch.zeros(len(l2_grid), len(y_N), dtype=torch.float64)
        for fold in range(folds):
            fit, held = fold_N != fold, fold_N == fold
            mean_F, std_F = _standardise(x_NF[fit])
            path = _ridge_path((x_NF[fit] - mean_F) / std_F, y_N[fit], l2_grid)
            z_held = (x_NF[held] - mean_F) / std_F
            for index, (w_F, b) in enumerate(path):
                out_of_fold[index, held] = z_held @ w_F + b
        for index, l2 in enumerate(l2_grid):
            apgr = routing_apgr(out_of_fold[index], y_N)
            results.append((candidate, l2, apgr))
            if best is None or apgr > best["cv_apgr"]:
                best = {"candidate": candidate, "l2": l2, "cv_apgr": apgr, "columns": list(columns),
                        "out_of_fold": out_of_fold[index].clone()}
    assert best is not None
    best["results"] = results
    best["num_documents"] = len(documents)
    return best


def _platt_linear(x_NF: torch.Tensor, gain: torch.Tensor, l2: float, out_of_fold: torch.Tensor,
                  margin: float) -> tuple[list[float], list[float], list[float], float]:
    """The ridge of `gain` on all of x_NF, scaled so that sigmoid(z . w + b) estimates P(gain > margin).

    The scale comes from a 1-D logistic fit on the out-of-fold predictions, so
    the probability is calibrated on queries the ridge did not see.
    Returns (mean, std, weights, bias) on standardised features.
    """
    y_N = torch.as_tensor(gain, dtype=torch.float64).reshape(-1)
    mean_F, std_F = _standardise(x_NF)
    (w_F, b), = _ridge_path((x_NF - mean_F) / std_F, y_N, [l2])
    labels = (y_N > margin).to(torch.float64)
    if float(labels.min()) == float(labels.max()):
        raise ValueError(f"margin: the gain is {'above' if labels[0] else 'at most'} margin={margin} on every "
                         f"query; both classes are needed to scale the router to a probability")
    p_mean, p_std = float(out_of_fold.mean()), float(out_of_fold.std(unbiased=False)) or 1.0
    # A light penalty keeps the slope finite when the labels are separable (a saturated score cannot rank).
    (a,), c = _fit_logistic(((out_of_fold - p_mean) / p_std).unsqueeze(1), labels, 1e-2)
    scale = float(a) / p_std
    return mean_F.tolist(), std_F.tolist(), (scale * w_F).tolist(), scale * (b - p_mean) + c


def fit_probe(features: torch.Tensor, gain: torch.Tensor, groups: Sequence[int], full: HiddenFeatures,
              candidates: Sequence[HiddenFeatures], *, margin: float = 0.0, l2_grid: Sequence[float] = PROBE_L2_GRID,
              folds: int = 5, seed: int = 0) -> tuple[DifficultyRouter, dict[str, Any]]:
    """The hidden-state probe: which layers and penalty, by cross-validation over whole documents.

    NOTE: the fit.
    1. Model: ridge regression of the large tier's gain (nats/token) on the
       standardised signals and the candidate's pooled hidden states.
    2. Selection: `cross_validated_ridge` over the candidates and `l2_grid`.
    3. Output: the winner refitted on every query, then Platt-scaled on its
       out-of-fold predictions to P(gain > margin), so the router's score is a
       probability like the logistic router's, ranked the same as the ridge.

    Args:
        features: (N, len(SIGNAL_NAMES) + full.width) rows of `prompt_signals(..., hidden=full)`.
        gain: (N,) the large tier's quality minus the small tier's.
        groups: (N,) the document of each query.
        full: the hidden features the rows hold.
        candidates: feature sets to choose from (each a subset of `full`).
        margin: the Platt labels are gain > margin.
        l2_grid: penalties tried.
        folds: cross-validation folds (at least 2, at most the number of documents).
        seed: the assignment of documents to folds.
    Returns:
        (the router, its `hidden` set to the winner; a report of every candidate's
        cross-validated APGR and the winner).
    """
    x_all = torch.as_tensor(features, dtype=torch.float64).cpu()
    if x_all.dim() != 2 or x_all.shape[1] != len(SIGNAL_NAMES) + full.width:
        raise ValueError(f"features must have {len(SIGNAL_NAMES) + full.width} columns (the signals and "
                         f"{full.width} hidden-state columns), got shape {tuple(x_all.shape)}")
    signals = list(range(len(SIGNAL_NAMES)))
    column_sets = [signals + [len(SIGNAL_NAMES) + i for i in c.columns_in(full)] for c in candidates]
    best = cross_validated_ridge(x_all, gain, groups, column_sets, l2_grid=l2_grid, folds=folds, seed=seed)
    chosen = candidates[best["candidate"]]
    mean, std, weights, bias = _platt_linear(x_all[:, best["columns"]], gain, best["l2"], best["out_of_fold"], margin)
    router = DifficultyRouter(SIGNAL_NAMES, mean, std, weights, bias, hidden=chosen)
    report = {"chosen": {"layers": list(chosen.layers), "pooling": list(chosen.pooling), "l2": best["l2"],
                         "cv_apgr": best["cv_apgr"]},
              "folds": folds, "num_documents": best["num_documents"],
              "candidates": [{"layers": list(candidates[i].layers), "pooling": list(candidates[i].pooling),
                              "l2": l2, "cv_apgr": apgr} for i, l2, apgr in best["results"]]}
    return router, report


# ---- token-level post-hoc deferral -------------------------------------------------------

DEFERRAL_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
DEFERRAL_FEATURES = tuple(f"nll_q{round(100 * q)}" for q in DEFERRAL_QUANTILES) + ("nll_mean", "answer_tokens")


def answer_features(token_logprobs: Sequence[float]) -> list[float]:
    """Token-level uncertainty of an answer (`DEFERRAL_FEATURES`): quantiles and mean of its tokens' NLL, its length.

    Gupta et al. (ICLR 2024) defer on quantiles of the per-token uncertainty
    instead of the sequence mean, which is biased by length. An empty answer
    has all zeros.
    """
    if not token_logprobs:
        return [0.0] * len(DEFERRAL_FEATURES)
    nll = -torch.tensor([float(v) for v in token_logprobs], dtype=torch.float64)
    quantiles = torch.quantile(nll, torch.tensor(DEFERRAL_QUANTILES, dtype=torch.float64))
    return quantiles.tolist() + [float(nll.mean()), float(len(token_logprobs))]


@dataclass
class DeferralRule:
    """Post-hoc routing on the small tier's answer: P(the large tier answers better) from `answer_features`.

    Attributes:
        mean, std, weights, bias: a logistic model on standardised `DEFERRAL_FEATURES`.
        threshold: escalate when score >= threshold.
        fraction_thresholds: [escalated fraction, threshold] rows from the calibration answers.
    """

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float = 0.5
    fraction_thresholds: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_linear_model(self, "DeferralRule", len(DEFERRAL_FEATURES),
                            f"one per feature of {list(DEFERRAL_FEATURES)}")
        _check_table(self.fraction_thresholds, "DeferralRule.fraction_thresholds", increasing=False)
        self.fraction_thresholds = [[float(f), float(t)] for f, t in self.fraction_thresholds]

    def score(self, answers: Sequence[Sequence[float]]) -> torch.Tensor:
        """P(large is better) (N,) float64 for N answers, each its tokens' log-probabilities."""
        x_NF = torch.tensor([answer_features(a) for a in answers], dtype=torch.float64).reshape(-1, len(self.mean))
        z_NF = (x_NF - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.std, dtype=torch.float64)
        return torch.sigmoid(z_NF @ torch.tensor(self.weights, dtype=torch.float64) + self.bias)

    def threshold_for_fraction(self, fraction: float) -> float:
        """The score threshold escalating `fraction` of the calibration answers (interpolated)."""
        return _interpolate(self.fraction_thresholds, fraction, "fraction_thresholds")

    @classmethod
    def fit(cls, answers: Sequence[Sequence[float]], gain: torch.Tensor, groups: Sequence[int], *,
            margin: float = 0.0, l2_grid: Sequence[float] = PROBE_L2_GRID, folds: int = 5,
            seed: int = 0) -> tuple["DeferralRule", dict[str, Any]]:
        """Ridge of the gain on the answer features, penalty by cross-validation over documents, Platt-scaled.

        Args:
            answers: the small tier's answer to each calibration query, as token log-probabilities.
            gain, groups, margin, l2_grid, folds, seed: as `fit_probe`.
        Returns:
            (the rule, thresholds set for every fraction of `TABLE_FRACTIONS` style use by
            the caller; a report with the cross-validated APGR).
        """
        x_NF = torch.tensor([answer_features(a) for a in answers], dtype=torch.float64)
        best = cross_validated_ridge(x_NF, gain, groups, [list(range(len(DEFERRAL_FEATURES)))], l2_grid=l2_grid,
                                     folds=folds, seed=seed)
        mean, std, weights, bias = _platt_linear(x_NF, gain, best["l2"], best["out_of_fold"], margin)
        report = {"l2": best["l2"], "cv_apgr": best["cv_apgr"], "folds": folds,
                  "num_documents": best["num_documents"]}
        return cls(mean, std, weights, bias), report


def _check_linear_model(record: Any, name: str, num_features: int, what: str) -> None:
    """A standardised linear model's fields: mean, std (positive), weights of `num_features` finite numbers each
    (stored as floats), and a finite bias and threshold; ValueError naming the field otherwise."""
    for key in ("mean", "std", "weights"):
        values = getattr(record, key)
        if (not isinstance(values, (list, tuple)) or len(values) != num_features
                or not all(_is_finite_number(v) for v in values)):
            shown = values if not isinstance(values, (list, tuple)) or len(values) < 16 else f"{len(values)} values"
            raise ValueError(f"{name}.{key} must be {num_features} finite numbers ({what}), got {shown!r}")
        setattr(record, key, [float(v) for v in values])
    if not all(v > 0 for v in record.std):
        raise ValueError(f"{name}.std must be positive, got {record.std}")
    for key in ("bias", "threshold"):
        if not _is_finite_number(getattr(record, key)):
            raise ValueError(f"{name}.{key} must be a finite number, got {getattr(record, key)!r}")


def _nested(value: Any, cls: type, name: str) -> Any:
    """A nested record of a router file: None, an instance of `cls`, or a dict of its fields (checked by name)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{name}: unknown field(s) {unknown}")
        try:
            return cls(**value)
        except TypeError as err:
            raise ValueError(f"{name}: {err}") from None
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__} or null, got {value!r}")
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_table(table: Any, name: str, *, increasing: bool) -> None:
    """[fraction, threshold] rows with fractions ascending in [0, 1] and monotone thresholds."""
    ok = isinstance(table, (list, tuple)) and all(
        isinstance(row, (list, tuple)) and len(row) == 2 and all(_is_finite_number(v) for v in row) for row in table)
    if ok:
        fractions = [row[0] for row in table]
        thresholds = [row[1] for row in table]
        ok = (all(0 <= f <= 1 for f in fractions) and all(a < b for a, b in zip(fractions, fractions[1:]))
              and all((a <= b) if increasing else (a >= b) for a, b in zip(thresholds, thresholds[1:])))
    if not ok:
        direction = "non-decreasing" if increasing else "non-increasing"
        raise ValueError(f"{name} must be [fraction, threshold] pairs with fractions ascending in [0, 1] and "
                         f"{direction} thresholds, got {table!r}")


def _columns(signals: torch.Tensor, names: Sequence[str], hidden_width: int = 0) -> torch.Tensor:
    """The named signal columns of `prompt_signals` rows, then their `hidden_width` hidden-state columns."""
    signals = torch.as_tensor(signals, dtype=torch.float64).cpu()
    width = len(SIGNAL_NAMES) + hidden_width
    if signals.dim() != 2 or signals.shape[1] != width:
        extra = f" + {hidden_width} hidden-state columns" if hidden_width else ""
        raise ValueError(f"signals must be (N, {width}) rows of prompt_signals ({list(SIGNAL_NAMES)}{extra}), "
                         f"got shape {tuple(signals.shape)}")
    if not torch.isfinite(signals).all():
        raise ValueError("signals must be finite")
    return torch.cat([signals[:, [SIGNAL_NAMES.index(n) for n in names]], signals[:, len(SIGNAL_NAMES):]], dim=1)


__all__ = [
    "DEFERRAL_FEATURES", "POOLINGS", "SIGNAL_NAMES", "DeferralRule", "DifficultyRouter", "HiddenFeatures",
    "answer_features", "cross_validated_ridge", "feature_row", "fit_probe", "pooled_hidden", "routing_apgr",
    "confidence_threshold_for_escalation", "escalate_posthoc",
    "prompt_signals", "signals_from_prefill", "threshold_for_budget", "threshold_for_count",
    "threshold_for_large_fraction", "tier_for_score",
]
