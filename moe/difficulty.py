"""How hard a prompt is for the cascade: pre-generation signals, a learned router, thresholds.

Shape legend: N prompts, F signals, B batch, S positions (right-padded), V vocabulary,
E experts.

    signals_NF = prompt_signals(small_model, prompt_ids)        # one prefill of the small model
    router = DifficultyRouter.fit(signals_NF, labels_N)          # labels: the large model was better
    router.threshold = threshold_for_large_fraction(router.score(signals_NF), 0.3)
    route_to_large = router.score(signals_NF) >= router.threshold

Pre-generation routing (RouteLLM): the router sees only the prompt, through
signals of the small model's prefill, and sends a query to one tier. Post-hoc
routing (FrugalGPT, AutoMix): the small model answers, and the query goes to
the large model when the answer's mean token confidence is low
(`escalate_posthoc`). Everything here is a plain function of tensors; the
calibration that fits and evaluates the router is `moe.calibrate`.
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

SIGNAL_NAMES = ("mean_nll", "max_nll", "mean_entropy", "prompt_tokens", "router_entropy")
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
        rows.append([mean_nll, max_nll, entropy_sum / n, float(n), router_entropy])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def prompt_signals(model: MoETransformer, prompt_ids: list[list[int]], *, batch_size: int = 8) -> torch.Tensor:
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
    Returns:
        (N, len(SIGNAL_NAMES)) float64 on the CPU.
    """
    check_prompt_ids(prompt_ids, model.config.vocab_size)
    device = model.embed_tokens.weight.device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = torch.empty(len(prompt_ids), len(SIGNAL_NAMES), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            prompts = [prompt_ids[i] for i in chunk]
            result = model(right_pad(prompts, device), ignore_capacity=True, return_router_probs=True)
            out[chunk] = signals_from_prefill(result.logits, result.router_probs, prompts)
    finally:
        model.train(was_training)
    return out


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
        raise ValueError(f"this router has no {what} table (it was not calibrated by moe.calibrate)")
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
        mean, std: standardisation of each used signal.
        weights, bias: the logistic model on standardised signals.
        threshold: route to large when score >= threshold.
        fraction_thresholds: [large fraction, threshold] rows, fractions
            ascending, from the calibration set's scores (`threshold_for_fraction`).
        posthoc_threshold: the calibrated confidence threshold of post-hoc
            escalation (`escalate_posthoc`), None if not calibrated.
        posthoc_fraction_thresholds: [escalated fraction, confidence threshold] rows.
        metadata: free-form facts about the calibration (checkpoints, data, sizes).
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

    def __post_init__(self) -> None:
        self.signal_names = tuple(self.signal_names)
        unknown = [n for n in self.signal_names if n not in SIGNAL_NAMES]
        if not self.signal_names or unknown or len(set(self.signal_names)) != len(self.signal_names):
            raise ValueError(f"DifficultyRouter.signal_names must be distinct names from {list(SIGNAL_NAMES)}, "
                             f"got {list(self.signal_names)}")
        for name in ("mean", "std", "weights"):
            values = getattr(self, name)
            if (not isinstance(values, (list, tuple)) or len(values) != len(self.signal_names)
                    or not all(_is_finite_number(v) for v in values)):
                raise ValueError(f"DifficultyRouter.{name} must be {len(self.signal_names)} finite numbers "
                                 f"(one per signal), got {values!r}")
            setattr(self, name, [float(v) for v in values])
        if not all(v > 0 for v in self.std):
            raise ValueError(f"DifficultyRouter.std must be positive, got {self.std}")
        for name in ("bias", "threshold"):
            if not _is_finite_number(getattr(self, name)):
                raise ValueError(f"DifficultyRouter.{name} must be a finite number, got {getattr(self, name)!r}")
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

    def score(self, signals: torch.Tensor) -> torch.Tensor:
        """P(large is better) (N,) float64 for (N, len(SIGNAL_NAMES)) `prompt_signals` rows."""
        x_NF = _columns(signals, self.signal_names)
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
            raise FileNotFoundError(f"router file {path} does not exist (write one with python -m moe.calibrate)")
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


def _columns(signals: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    signals = torch.as_tensor(signals, dtype=torch.float64).cpu()
    if signals.dim() != 2 or signals.shape[1] != len(SIGNAL_NAMES):
        raise ValueError(f"signals must be (N, {len(SIGNAL_NAMES)}) rows of prompt_signals ({list(SIGNAL_NAMES)}), "
                         f"got shape {tuple(signals.shape)}")
    if not torch.isfinite(signals).all():
        raise ValueError("signals must be finite")
    return signals[:, [SIGNAL_NAMES.index(n) for n in names]]


__all__ = [
    "SIGNAL_NAMES", "DifficultyRouter", "confidence_threshold_for_escalation", "escalate_posthoc",
    "prompt_signals", "signals_from_prefill", "threshold_for_budget", "threshold_for_count",
    "threshold_for_large_fraction", "tier_for_score",
]
