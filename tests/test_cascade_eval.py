"""`python -m cascade.evaluate`: curve arithmetic against brute force, FLOPs against a loop, and the CLI on
two tiny trained tiers (the shared `cascade_pair` fixture)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.evaluate import (answer_flops, area, first_crossing, forward_flops, gain_curve, main, pgr_curve,
                              router_summary)
from moe import ModelConfig, load_checkpoint
from moe.difficulty import SIGNAL_NAMES
from moe.model import count_parameters

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_flops_matches_a_per_position_loop() -> None:
    for window in (None, 5):
        config = ModelConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                             max_seq_len=64, sliding_window=window, experts=dict(num_experts=4, hidden_size=16))
        active = count_parameters(config)["active_non_embedding"]
        for n in (0, 1, 4, 5, 6, 17):
            expected = sum(2 * active + 4 * 3 * 4 * 8 * min(t + 1, window or n) for t in range(n))
            assert forward_flops(config, n) == pytest.approx(expected, rel=1e-12), (window, n)
        # Decoding G tokens after a prompt of P feeds P + G - 1 positions.
        assert answer_flops(config, 7, 3) == forward_flops(config, 9)
        assert answer_flops(config, 7, 0) == answer_flops(config, 7, 1) == forward_flops(config, 7)


def test_gain_curve_takes_the_highest_scores_first_and_averages_ties() -> None:
    values = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    curve = gain_curve(torch.tensor([0.1, 0.9, 0.5, 0.3]), values)
    assert curve.tolist() == pytest.approx([0.0, -2.0, 1.0, 1.5, 2.5])  # order 1, 2, 3, 0
    # A constant score is random routing: the expectation is a straight line.
    assert gain_curve(torch.zeros(4), values).tolist() == pytest.approx([0, 0.625, 1.25, 1.875, 2.5])

    # Ties inside a block: the curve equals the average over every order of the tied members.
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 3, (6,), generator=gen).double()
        values = torch.randn(6, generator=gen, dtype=torch.float64)
        curves = []
        for perm in itertools.permutations(range(6)):
            # a strict order that respects the scores, breaking ties by `perm`
            keys = [(float(-scores[i]), perm.index(i)) for i in range(6)]
            order = sorted(range(6), key=lambda i: keys[i])
            curves.append(torch.cat([torch.zeros(1, dtype=torch.float64), values[order].cumsum(0)]))
        assert torch.allclose(gain_curve(scores, values), torch.stack(curves).mean(0), atol=1e-12)


def test_pgr_apgr_and_cpt() -> None:
    q_small = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q_large = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # gains 4, 3, 2, 1 (total 10)
    oracle = pgr_curve(q_large - q_small, q_small, q_large)
    assert oracle.tolist() == pytest.approx([0, 0.4, 0.7, 0.9, 1.0])
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert area(x, oracle) == pytest.approx(0.25 * (0.4 + 0.7 + 0.9) + 0.125 * (0 + 1.0))
    assert first_crossing(x, oracle, 0.5) == pytest.approx(0.25 + 0.25 * (0.1 / 0.3))
    assert first_crossing(x, oracle, 0.9) == pytest.approx(0.75)
    assert first_crossing(x, oracle, 1.5) is None

    costs = torch.ones(4, dtype=torch.float64), torch.full((4,), 3.0, dtype=torch.float64)
    random = router_summary(torch.zeros(4), q_small, q_large, *costs, cost_all_large=12.0)
    assert random["apgr"] == pytest.approx(0.5)
    assert random["cpt50"] == pytest.approx(0.5) and random["cpt80"] == pytest.approx(0.8)
    # Cost at 50% large calls: 2 * 1 + 2 * 3 = 8 of 12.
    assert random["cost_cpt50"] == pytest.approx(8 / 12) and random["cost_range"] == pytest.approx([4 / 12, 1.0])
    worst = router_summary(q_small - q_large, q_small, q_large, *costs, cost_all_large=12.0)
    best = router_summary(q_large - q_small, q_small, q_large, *costs, cost_all_large=12.0)
    assert worst["apgr"] < random["apgr"] < best["apgr"]

    with pytest.raises(ValueError, match="not better"):
        pgr_curve(torch.zeros(4), q_large, q_small)


def test_next_token_metric_matches_each_query_alone(cascade_pair) -> None:
    """`next_token_correct` (batched, right-padded) against each query's own prefill and argmax."""
    from cascade.calibrate import make_queries, next_token_correct, read_split_documents

    model = load_checkpoint(cascade_pair["large"]).eval()
    pairs = make_queries(read_split_documents(cascade_pair["data"], "validation", 64, 9), 12, 8, seed=0,
                         num_queries=40)
    expected = []
    with torch.no_grad():
        for query, continuation in pairs:
            logits = model(torch.tensor([query]), ignore_capacity=True).logits[0, -1]
            expected.append(float(int(logits.argmax()) == continuation[0]))
    got = next_token_correct(model, pairs, batch_size=8)
    assert got.tolist() == expected and 0 < sum(expected) < len(expected)


def test_cli_reports_every_router_consistently(cascade_pair, capsys) -> None:
    """One run with the routers fitted on `next_token` (metric=next_token); every metric's curves reported."""
    out = cascade_pair["root"] / "cascade_eval"
    main([f"small={cascade_pair['small']}", f"large={cascade_pair['large']}", f"output={out}", "prompt_tokens=12",
          "continuation_tokens=8", "line_tokens=8", "num_queries=200", "calibration_queries=150", "bootstrap=20",
          "device=cpu", f"distilled={cascade_pair['large']}", "timing_queries=5", "metric=next_token"])
    printed = capsys.readouterr().out
    assert "APGR" in printed and "cascade_eval.json" in printed
    report = json.loads((out / "cascade_eval.json").read_text())
    assert (out / "cascade_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert 10 <= report["num_calibration"] <= 150 and 10 <= report["num_test"] <= 200
    # Routers fit on the calibration split and are tested on the validation split, each document's windows.
    manifest = json.loads((cascade_pair["data"] / "manifest.json").read_text())
    assert report["documents"] == {"calibration": manifest["splits"]["calibration"]["num_documents"],
                                   "test": manifest["splits"]["validation"]["num_documents"]}
    routers = report["routers"]
    expected = {"random", "learned", "learned_regression", "probe", "posthoc", "deferral", "oracle",
                *(f"signal:{name}" for name in SIGNAL_NAMES)}
    assert set(routers) == expected and report["settings"]["metric"] == "next_token"
    # The probe chose one of its candidates (each layer of the small tier, or all) by cross-validation.
    probe = report["probe"]
    layers = list(range(load_checkpoint(cascade_pair["small"]).config.num_layers))
    assert probe["chosen"]["layers"] in [[layer] for layer in layers] + [layers]
    assert probe["chosen"]["cv_apgr"] == max(c["cv_apgr"] for c in probe["candidates"])
    assert 0 < report["deferral"]["cv_apgr"] < 1
    assert routers["random"]["apgr"] == pytest.approx(0.5)
    assert routers["random"]["cpt50"] == pytest.approx(0.5) and routers["random"]["cpt80"] == pytest.approx(0.8)
    for name, entry in routers.items():
        assert 0 <= entry["apgr"] <= 1 and entry["apgr"] <= routers["oracle"]["apgr"] + 1e-9, name
        curve = entry["loglik"]["curve"]
        assert curve["pgr"][0] == pytest.approx(0) and curve["pgr"][-1] == pytest.approx(1)
        assert len(curve["large_fraction"]) == len(curve["pgr"]) == len(curve["cost_fraction"]) == 101
        assert entry["loglik"]["apgr_std"] is not None and entry["loglik"]["apgr_std"] >= 0
        # The summary columns are the fitted metric's.
        assert entry["apgr"] == entry["next_token"]["apgr"] and entry["cpt80"] == entry["next_token"]["cpt80"]
    # Costs: random pays no router, so its all-large end is exactly the large tier's cost; a pre-generation
    # router pays the prefill on top, post-hoc pays the small answer on every query.
    tiers = report["tiers"]
    small_share = tiers["small"]["flops_per_query"] / tiers["large"]["flops_per_query"]
    assert routers["random"]["loglik"]["cost_range"] == pytest.approx([small_share, 1.0])
    assert routers["learned"]["loglik"]["cost_range"][1] == pytest.approx(
        1 + report["router_prefill_flops_per_query"] / tiers["large"]["flops_per_query"])
    assert routers["posthoc"]["loglik"]["cost_range"] == pytest.approx([small_share, 1 + small_share])
    assert routers["deferral"]["loglik"]["cost_range"] == pytest.approx([small_share, 1 + small_share])
    assert routers["probe"]["loglik"]["cost_range"] == routers["learned"]["loglik"]["cost_range"]
    # Wall time per query, measured one query at a time: each router's share of all-large time at PGR 50%/80%.
    seconds = report["seconds_per_query"]
    assert seconds["queries"] == 5 and all(seconds[k] > 0 for k in ("small", "large", "router_prefill"))
    assert routers["random"]["time_cpt50"] == pytest.approx(
        (seconds["small"] + 0.5 * (seconds["large"] - seconds["small"])) / seconds["large"], rel=1e-6)
    assert all(entry["time_cpt80"] is None or entry["time_cpt80"] > 0 for entry in routers.values())
    assert tiers["large"]["active_params"] > tiers["small"]["active_params"]
    assert tiers["large"]["loglik"] > tiers["small"]["loglik"], "the fixture's large tier is trained"
    queries = report["test_queries"]
    assert len(queries) == report["num_test"]
    # A third model alone (here the large tier itself, so it recovers the whole gap at its own cost).
    alone = report["distilled"]
    assert alone["loglik"] == pytest.approx(tiers["large"]["loglik"], abs=1e-9)
    assert alone["pgr"] == pytest.approx(1.0) and 0 < alone["cost_fraction"] <= 1.5
    assert alone["next_token"] == pytest.approx(tiers["large"]["next_token"])
    assert alone["next_token_pgr"] is None or alone["next_token_pgr"] == pytest.approx(1.0)
    for tier in ("small", "large"):
        assert 0 <= tiers[tier]["exact_match"] <= 1
        for metric in ("loglik", "exact_match", "next_token"):
            assert tiers[tier][metric] == pytest.approx(sum(q[f"{metric}_{tier}"] for q in queries) / len(queries))
    # The learned router's labels are the calibration queries' next-token gains above the margin (their median).
    assert report["settings"]["margin"] in (-1.0, 0.0, 1.0)
    assert 0 < report["learned"]["calibration_label_rate"] < 1


def test_errors_name_the_argument(cascade_pair, capsys, tmp_path) -> None:
    small, large = cascade_pair["small"], cascade_pair["large"]
    other = tmp_path / "other_large"
    shutil.copytree(large, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|eos|>"
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([f"small={small}", f"large={large}"], "output=DIR is required"),
        ([f"small={small}", f"large={large}", f"output={tmp_path / 'o'}", "bootstrap=-1"], "bootstrap"),
        ([f"small={small}", f"large={large}", f"output={tmp_path / 'o'}", "line_tokens=60"], "prompt_tokens"),
        ([f"small={small}", f"large={large}", f"output={a_file}"], "output: .* not a directory"),
        ([f"small={small}", f"large={large}", f"output={tmp_path / 'o'}", "metric=exact_match"],
         "metric must be one of"),
        ([f"small={small}", f"large={other}", f"output={tmp_path / 'o'}"], re.escape(str(other / "tokenizer.json"))),
        # The large tier must be better: an untrained model as both tiers has no gap to recover.
        ([f"small={small}", f"large={small}", f"output={tmp_path / 'o'}", "prompt_tokens=12",
          "continuation_tokens=8", "line_tokens=8"], "large: .* is not better than small"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["device=cpu"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), (message, err)
    assert not (tmp_path / "o").exists(), "nothing written before the inputs are checked"


def test_cli_process_exit_code(cascade_pair, tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "cascade.evaluate", f"small={cascade_pair['small']}"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "large=CKPT is required" in result.stderr
