"""Difficulty signals against a token-by-token float64 loop, the logistic router, thresholds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe import ModelConfig, MoETransformer
from moe.difficulty import (PROBE_L2_GRID, SIGNAL_NAMES, DifficultyRouter, HiddenFeatures,
                            confidence_threshold_for_escalation, escalate_posthoc, fit_probe, prompt_signals,
                            routing_apgr, threshold_for_budget, threshold_for_large_fraction, tier_for_score)

TINY = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=32,
            first_k_dense=1, sliding_window=4, experts=dict(num_experts=4, hidden_size=16, backend="loop"),
            router=dict(top_k=2))
PROMPTS = [[5, 9, 3, 7, 1, 8, 2, 2, 6], [11], [4, 4, 8, 15]]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(**{**TINY, **overrides})).double().eval()


def reference_signals(model: MoETransformer, ids: list[int]) -> list[float]:
    """Each prefix recomputed alone (dropless, as the signals are defined); NLL, entropies and
    router entropy summed in Python floats."""
    nll, entropies, router_entropies = [], [], []
    with torch.no_grad():
        for i in range(len(ids)):
            out = model(torch.tensor([ids[:i + 1]]), ignore_capacity=True, return_router_probs=True)
            probs = torch.softmax(out.logits[0, -1], -1).tolist()
            entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
            if i + 1 < len(ids):
                nll.append(-math.log(probs[ids[i + 1]]))
            for layer_probs in out.router_probs:
                router_entropies.append(-sum(p * math.log(p) for p in layer_probs[0, -1].tolist() if p > 0))
    num_moe = model.config.num_moe_layers
    first, second = sorted(probs, reverse=True)[:2]  # the last position's next-token distribution
    return [sum(nll) / len(nll) if nll else 0.0, max(nll) if nll else 0.0, sum(entropies) / len(ids),
            float(len(ids)), sum(router_entropies) / (len(ids) * num_moe) if num_moe else 0.0,
            first, first - second, entropies[-1]]


@pytest.mark.parametrize("overrides", [dict(), dict(router=dict(top_k=2, score_func="sigmoid", capacity_factor=0.5)),
                                       dict(first_k_dense=3)], ids=["softmax", "sigmoid_capacity", "dense"])
def test_signals_match_token_loop(overrides: dict) -> None:
    model = tiny_model(**overrides)
    got = prompt_signals(model, PROMPTS, batch_size=2)
    assert got.dtype == torch.float64 and got.shape == (3, len(SIGNAL_NAMES))
    expected = torch.tensor([reference_signals(model, ids) for ids in PROMPTS], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert got[1, :2].tolist() == [0.0, 0.0], "a 1-token prompt has no NLL term"
    if overrides.get("first_k_dense") == 3:
        assert (got[:, 4] == 0).all(), "a dense model has no router entropy"
    else:
        assert (got[:, 4] > 0).all() and (got[:, 4] <= math.log(4) + 1e-12).all()


def test_signals_are_padding_invariant() -> None:
    model = tiny_model(router=dict(top_k=2, capacity_factor=0.5))
    batched = prompt_signals(model, PROMPTS + [[1] * 20], batch_size=4)
    for row, ids in enumerate(PROMPTS):
        torch.testing.assert_close(batched[row], prompt_signals(model, [ids])[0], atol=1e-12, rtol=1e-12)
    model.train()
    prompt_signals(model, PROMPTS)
    assert model.training, "the model's mode is restored"
    with pytest.raises(ValueError, match="prompt"):
        prompt_signals(model, [[1, 2], []])


def synthetic(num: int, weights: list[float], bias: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signals on very different scales; labels drawn from a logistic model of the standardised signals."""
    generator = torch.Generator().manual_seed(seed)
    weights = list(weights) + [0.0] * (len(SIGNAL_NAMES) - len(weights))  # the signals not named weigh nothing
    scales = torch.tensor([1.0, 3.0, 0.1, 100.0, 0.5, 0.2, 0.05, 2.0], dtype=torch.float64)
    signals = torch.randn(num, len(SIGNAL_NAMES), generator=generator, dtype=torch.float64) * scales + 2 * scales
    z = (signals - signals.mean(0)) / signals.std(0, unbiased=False)
    p = torch.sigmoid(z @ torch.tensor(weights, dtype=torch.float64) + bias)
    labels = (torch.rand(num, generator=generator, dtype=torch.float64) < p).to(torch.float64)
    return signals, labels


def newton_reference(z: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Plain Newton iterations (no line search) on mean log-loss + l2/2 |w|^2, bias unpenalised."""
    a = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
    reg = torch.diag(torch.tensor([l2] * z.shape[1] + [0.0], dtype=torch.float64))
    theta = torch.zeros(a.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(a @ theta)
        grad = a.T @ (p - y) / len(y) + reg @ theta
        hessian = a.T @ (a * (p * (1 - p)).unsqueeze(1)) / len(y) + reg
        theta = theta - torch.linalg.solve(hessian, grad)
    return theta


def test_logistic_regression_recovers_weights_and_matches_reference() -> None:
    true_weights, true_bias = [1.5, -2.0, 0.0, 0.7, 0.3], -0.4
    signals, labels = synthetic(20000, true_weights, true_bias)
    router = DifficultyRouter.fit(signals, labels, l2=1e-6)
    assert router.signal_names == SIGNAL_NAMES
    torch.testing.assert_close(torch.tensor(router.weights),
                               torch.tensor(true_weights + [0.0] * (len(SIGNAL_NAMES) - 5)), atol=0.1, rtol=0)
    assert router.bias == pytest.approx(true_bias, abs=0.1)

    signals, labels = synthetic(300, true_weights, true_bias, seed=1)
    router = DifficultyRouter.fit(signals, labels, l2=0.05)
    z = (signals - signals.mean(0)) / signals.std(0, unbiased=False)
    expected = newton_reference(z, labels, 0.05)
    torch.testing.assert_close(torch.tensor(router.weights + [router.bias], dtype=torch.float64), expected,
                               atol=1e-9, rtol=1e-9)
    # The gradient of the penalised objective vanishes at the fit.
    theta = torch.tensor(router.weights + [router.bias], dtype=torch.float64, requires_grad=True)
    logits = z @ theta[:-1] + theta[-1]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 0.025 * theta[:-1].square().sum()
    loss.backward()
    assert theta.grad.abs().max() < 1e-9
    # score() is the logistic model of the standardised signals.
    torch.testing.assert_close(router.score(signals), torch.sigmoid(logits.detach()), atol=1e-12, rtol=1e-12)


def test_fit_on_a_subset_of_signals_and_errors() -> None:
    signals, labels = synthetic(500, [1.0, 0.0, 0.0, -1.0, 0.0], 0.0)
    router = DifficultyRouter.fit(signals, labels, signal_names=("prompt_tokens", "mean_nll"))
    assert router.signal_names == ("prompt_tokens", "mean_nll") and len(router.weights) == 2
    assert router.weights[0] < 0 < router.weights[1]
    changed = signals.clone()
    changed[:, [1, 2, 4]] = 0.0  # columns the router does not use
    torch.testing.assert_close(router.score(changed), router.score(signals))
    with pytest.raises(ValueError, match="labels are all 1"):
        DifficultyRouter.fit(signals, torch.ones(500))
    with pytest.raises(ValueError, match="l2"):
        DifficultyRouter.fit(signals, labels, l2=0.0)
    with pytest.raises(ValueError, match="signals"):
        DifficultyRouter.fit(signals[:, :3], labels)
    with pytest.raises(ValueError, match="labels"):
        DifficultyRouter.fit(signals, labels[:10])
    with pytest.raises(ValueError, match="signal_names"):
        DifficultyRouter.fit(signals, labels, signal_names=("perplexity",))
    constant = signals.clone()
    constant[:, 2] = 7.0  # a constant signal gets std 1 and weight 0
    fitted = DifficultyRouter.fit(constant, labels)
    assert fitted.std[2] == 1.0 and abs(fitted.weights[2]) < 1e-12


def fitted_router() -> DifficultyRouter:
    signals, labels = synthetic(400, [1.0, -1.0, 0.5, 0.0, 0.2], 0.1)
    router = DifficultyRouter.fit(signals, labels)
    scores = router.score(signals)
    router.fraction_thresholds = [[f / 10, threshold_for_large_fraction(scores, f / 10)] for f in range(11)]
    router.threshold = router.threshold_for_fraction(0.3)
    router.posthoc_threshold = 0.6
    router.posthoc_fraction_thresholds = [[0.0, 0.2], [0.5, 0.6], [1.0, 0.9]]
    router.metadata = {"small": "a", "num_queries": 400}
    return router


def test_json_round_trip(tmp_path) -> None:
    router = fitted_router()
    router.save(tmp_path / "router.json")
    loaded = DifficultyRouter.load(tmp_path / "router.json")
    assert loaded == router
    signals, _ = synthetic(50, [0.0] * 5, 0.0, seed=3)
    assert torch.equal(loaded.score(signals), router.score(signals))
    assert loaded.threshold_for_fraction(0.25) == pytest.approx(
        (router.fraction_thresholds[2][1] + router.fraction_thresholds[3][1]) / 2)
    assert loaded.posthoc_threshold_for_fraction(0.25) == pytest.approx(0.4)
    payload = json.loads((tmp_path / "router.json").read_text())
    assert payload["format"] == "moe.difficulty_router" and payload["signal_names"] == list(SIGNAL_NAMES)


def test_a_router_of_the_first_five_signals_still_scores_todays_rows(tmp_path) -> None:
    """router.json names its signals: one written before the next-token signals existed (the first five) loads
    and scores today's wider `prompt_signals` rows on its own columns."""
    signals, labels = synthetic(300, [1.0, -1.0, 0.5, 0.2, 0.3], 0.1)
    DifficultyRouter.fit(signals, labels, signal_names=SIGNAL_NAMES[:5]).save(tmp_path / "old.json")
    loaded = DifficultyRouter.load(tmp_path / "old.json")
    assert loaded.signal_names == SIGNAL_NAMES[:5] and len(loaded.weights) == 5
    mean, std, weights = (torch.tensor(v, dtype=torch.float64) for v in (loaded.mean, loaded.std, loaded.weights))
    expected = torch.sigmoid((signals[:, :5] - mean) / std @ weights + loaded.bias)
    torch.testing.assert_close(loaded.score(signals), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.pop("weights"), "missing field.*weights"),
    (lambda p: p.update(wieghts=[1.0]), "unknown field.*wieghts"),
    (lambda p: p.update(std=[1.0, 1.0]), "std"),
    (lambda p: p.update(std=[1.0, 1.0, -1.0, 1.0, 1.0]), "std"),
    (lambda p: p.update(mean=["a", 1, 1, 1, 1]), "mean"),
    (lambda p: p.update(bias=float("nan")), "bias"),
    (lambda p: p.update(bias=True), "bias"),
    (lambda p: p.update(signal_names=["mean_nll", "perplexity", "x", "y", "z"]), "signal_names"),
    (lambda p: p.update(threshold="high"), "threshold"),
    (lambda p: p.update(fraction_thresholds=[[0.5, 0.1], [0.2, 0.9]]), "fraction_thresholds"),
    (lambda p: p.update(fraction_thresholds=[[0.1, 0.1], [0.2, 0.9]]), "fraction_thresholds"),
    (lambda p: p.update(posthoc_threshold=[0.5]), "posthoc_threshold"),
    (lambda p: p.update(version=2), "version"),
    (lambda p: p.update(format="pickle"), "format"),
])
def test_load_refuses_bad_files_naming_the_field(tmp_path, edit, message: str) -> None:
    fitted_router().save(tmp_path / "router.json")
    payload = json.loads((tmp_path / "router.json").read_text())
    edit(payload)
    (tmp_path / "router.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message) as err:
        DifficultyRouter.load(tmp_path / "router.json")
    assert "router.json" in str(err.value)


def test_load_refuses_non_json_and_missing(tmp_path) -> None:
    (tmp_path / "router.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        DifficultyRouter.load(tmp_path / "router.json")
    (tmp_path / "router.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        DifficultyRouter.load(tmp_path / "router.json")
    with pytest.raises(FileNotFoundError, match="cascade.calibrate"):
        DifficultyRouter.load(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="fraction_thresholds"):
        DifficultyRouter.fit(*synthetic(100, [1.0] * 5, 0.0)).threshold_for_fraction(0.3)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.333, 0.5, 0.9, 1.0])
def test_quantile_threshold_gives_the_fraction(fraction: float) -> None:
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    threshold = threshold_for_large_fraction(scores, fraction)
    assert (scores >= threshold).sum().item() == round(fraction * 1000)
    confidence = confidence_threshold_for_escalation(scores, fraction)
    assert (scores < confidence).sum().item() == round(fraction * 1000)
    assert escalate_posthoc(0.2, 0.5) and not escalate_posthoc(0.5, 0.5)
    tied = (scores * 10).floor() / 10  # ten distinct values, 100 each: never more than asked
    assert (tied >= threshold_for_large_fraction(tied, fraction)).sum().item() <= round(fraction * 1000)
    assert (tied < confidence_threshold_for_escalation(tied, fraction)).sum().item() <= round(fraction * 1000)


def test_threshold_errors() -> None:
    scores = torch.rand(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="fraction"):
        threshold_for_large_fraction(scores, 1.5)
    with pytest.raises(ValueError, match="scores"):
        threshold_for_large_fraction(torch.tensor([]), 0.5)
    with pytest.raises(ValueError, match="completion_confidence"):
        escalate_posthoc(float("nan"), 0.5)
    with pytest.raises(ValueError, match="budget"):
        threshold_for_budget(scores, 2.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="cost_large"):
        threshold_for_budget(scores, 2.0, -5.0, 3.0)


@pytest.mark.parametrize("budget", [1.0, 1.3, 2.0, 3.99, 5.0, 9.0])
def test_budget_threshold_respects_the_budget(budget: float) -> None:
    scores = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cost_small, cost_large = 1.0, 5.0
    threshold = threshold_for_budget(scores, cost_small, cost_large, budget)
    num_large = int((scores >= threshold).sum())
    mean_cost = (num_large * cost_large + (500 - num_large) * cost_small) / 500
    assert mean_cost <= budget + 1e-12
    if num_large < 500:
        assert ((num_large + 1) * cost_large + (499 - num_large) * cost_small) / 500 > budget
    # A large tier no dearer than the small one takes everything.
    assert (scores >= threshold_for_budget(scores, 2.0, 2.0, 2.0)).all()


def test_tiers_for_more_than_two_models() -> None:
    scores = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    assert tier_for_score(scores, [0.3, 0.7]).tolist() == [0, 1, 1, 2, 2]
    assert tier_for_score(scores, []).tolist() == [0] * 5
    with pytest.raises(ValueError, match="non-decreasing"):
        tier_for_score(scores, [0.7, 0.3])


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_probs_are_the_gate_distribution(score_func: str) -> None:
    """MoEOutput.router_probs: softmax of the gate logits, or sigmoid scores normalised to sum 1."""
    model = tiny_model(router=dict(top_k=2, score_func=score_func, bias_update_rate=0.01))
    gate_logits = []  # each router's input through its gate (the router computes the GEMM itself, in float32+)
    hooks = [layer.ffn.router.register_forward_pre_hook(
        lambda router, args, kwargs: gate_logits.append(router.gate(args[0].reshape(-1, args[0].shape[-1]))),
        with_kwargs=True) for layer in model.layers if layer.is_moe]
    out = model(torch.tensor([PROMPTS[0]]), return_router_probs=True)
    for hook in hooks:
        hook.remove()
    assert len(out.router_probs) == model.config.num_moe_layers == len(gate_logits)
    for probs, logits in zip(out.router_probs, gate_logits):
        expected = torch.softmax(logits, -1) if score_func == "softmax" else \
            torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
        torch.testing.assert_close(probs.reshape(-1, 4), expected, atol=1e-12, rtol=1e-12)
        assert not probs.requires_grad
    assert model(torch.tensor([PROMPTS[0]])).router_probs == [], "only on request"


def test_large_fraction_for_budget_matches_threshold_for_budget() -> None:
    import math

    from moe.difficulty import large_fraction_for_budget, threshold_for_budget, threshold_for_count

    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for budget in (1.0, 1.5, 2.25, 3.0, 4.0):
        fraction = large_fraction_for_budget(1.0, 4.0, budget)
        assert fraction == pytest.approx((budget - 1.0) / 3.0)
        # The same cost model: the budget threshold sends the largest whole number of queries within it.
        count = math.floor(fraction * scores.numel() + 1e-9)
        assert threshold_for_count(scores, count) == threshold_for_budget(scores, 1.0, 4.0, budget)
    assert large_fraction_for_budget(1.0, 4.0, 9.0) == 1.0
    with pytest.raises(ValueError, match="below cost_small"):
        large_fraction_for_budget(1.0, 4.0, 0.5)


# ---- the hidden-state probe --------------------------------------------------------------

def test_pooled_hidden_states_match_each_prompt_alone() -> None:
    model = tiny_model(router=dict(top_k=2, capacity_factor=0.5))
    hidden = HiddenFeatures(layers=(2, 0), pooling=("last", "mean"), hidden_size=32)
    got = prompt_signals(model, PROMPTS, batch_size=3, hidden=hidden)
    assert got.shape == (3, len(SIGNAL_NAMES) + 2 * 2 * 32) and hidden.width == 128
    torch.testing.assert_close(got[:, :len(SIGNAL_NAMES)], prompt_signals(model, PROMPTS), atol=1e-12, rtol=1e-12)
    for row, ids in enumerate(PROMPTS):
        with torch.no_grad():
            states = model(torch.tensor([ids]), ignore_capacity=True, return_hidden_states=True).hidden_states
        expected = []
        for layer in (2, 0):
            h = states[layer][0].tolist()  # (n, D), summed in Python floats
            expected += h[-1] + [sum(col) / len(ids) for col in zip(*h)]
        torch.testing.assert_close(got[row, len(SIGNAL_NAMES):], torch.tensor(expected, dtype=torch.float64),
                                   atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="layers \\[2, 5\\] of width 32, but the small model has 3 layers"):
        prompt_signals(model, PROMPTS, hidden=HiddenFeatures((2, 5), ("last",), 32))
    with pytest.raises(ValueError, match="pooling"):
        HiddenFeatures((0,), ("max",), 32)


def test_routing_apgr_matches_the_definition() -> None:
    torch.manual_seed(1)
    scores, gain = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64) + 0.5
    order = sorted(range(50), key=lambda i: -float(scores[i]))
    total = float(gain.sum())
    recovered = [sum(float(gain[i]) for i in order[:k]) / total for k in range(51)]
    area = sum((a + b) / 2 for a, b in zip(recovered, recovered[1:])) / 50
    assert routing_apgr(scores, gain) == pytest.approx(area, rel=1e-12)
    assert routing_apgr(gain, gain) > 0.5 > routing_apgr(-gain, gain)
    assert math.isnan(routing_apgr(scores, -gain.abs()))


def test_probe_finds_the_informative_layer_and_generalises(tmp_path) -> None:
    """The gain depends on layer 1's last-token state only: cross-validation over documents picks that layer,
    and the Platt-scaled router ranks new queries like the true gain."""
    torch.manual_seed(0)
    size, num = 8, 600
    full = HiddenFeatures(layers=(0, 1, 2), pooling=("last", "mean"), hidden_size=size)
    direction = torch.randn(size, dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randn(n, len(SIGNAL_NAMES) + full.width, dtype=torch.float64)
        layer1_last = rows[:, len(SIGNAL_NAMES) + 2 * size:len(SIGNAL_NAMES) + 3 * size]
        return rows, 0.3 + layer1_last @ direction * 0.2 + 0.15 * torch.randn(n, dtype=torch.float64)

    features, gain = sample(num)
    groups = [i // 6 for i in range(num)]  # 100 documents of 6 queries
    candidates = [HiddenFeatures((layer,), ("last", "mean"), size) for layer in (0, 1, 2)] + [full]
    router, report = fit_probe(features, gain, groups, full, candidates, margin=0.3, folds=5)
    assert report["chosen"]["layers"] == [1] and report["chosen"]["cv_apgr"] > 0.8
    assert len(report["candidates"]) == len(candidates) * len(PROBE_L2_GRID)
    assert router.hidden == HiddenFeatures((1,), ("last", "mean"), size)
    test_features, test_gain = sample(400)
    rows = torch.cat([test_features[:, :len(SIGNAL_NAMES)],
                      test_features[:, len(SIGNAL_NAMES) + 2 * size:len(SIGNAL_NAMES) + 4 * size]], dim=1)
    scores = router.score(rows)
    assert ((scores > 0) & (scores < 1)).all()
    oracle = routing_apgr(test_gain, test_gain)
    assert routing_apgr(scores, test_gain) > 0.95 * oracle
    with pytest.raises(ValueError, match=rf"signals must be \(N, {len(SIGNAL_NAMES) + 16}\) rows"):
        router.score(test_features)
    router.save(tmp_path / "probe.json")
    loaded = DifficultyRouter.load(tmp_path / "probe.json")
    assert loaded.hidden == router.hidden
    torch.testing.assert_close(loaded.score(rows), scores, atol=0, rtol=0)
    with pytest.raises(ValueError, match="folds must be in \\[2, 100\\]"):
        fit_probe(features, gain, groups, full, candidates, folds=101)
    with pytest.raises(ValueError, match="margin"):
        fit_probe(features, gain, groups, full, candidates, margin=100.0)
