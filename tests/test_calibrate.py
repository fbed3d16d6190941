"""`python -m cascade.calibrate` on two tiny trained checkpoints and a tiny prepared corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.calibrate import (REPORT_FRACTIONS, continuation_nll, main, make_queries, read_split_documents,
                           roc_auc)
from moe.difficulty import DifficultyRouter

ROOT = Path(__file__).resolve().parents[1]
K, M = 12, 8  # prompt_tokens, continuation_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(cascade_pair):
    return cascade_pair


def median_margin(setup) -> float:
    """The median per-query NLL gap: a margin that gives both labels."""
    from moe import load_checkpoint

    pairs = make_queries(read_split_documents(setup["data"], "calibration", 256, M + 1), K, M, seed=0, num_queries=256)
    gaps = (continuation_nll(load_checkpoint(setup["small"]), pairs, 8)
            - continuation_nll(load_checkpoint(setup["large"]), pairs, 8))
    return float(gaps.median())


def test_cli_writes_a_consistent_report(setup, capsys) -> None:
    out = setup["root"] / "out"
    margin = median_margin(setup)
    main([f"small={setup['small']}", f"large={setup['large']}", f"out={out}", f"prompt_tokens={K}",
          f"continuation_tokens={M}", f"margin={margin}", "target_large_fraction=0.4", "device=cpu"])
    printed = capsys.readouterr().out
    assert "held-out AUC" in printed and "router.json" in printed
    report = json.loads((out / "calibration_report.json").read_text())
    router = DifficultyRouter.load(out / "router.json")

    n = report["num_heldout"]
    queries = report["heldout_queries"]
    assert report["num_fit"] + n == report["num_queries"] >= 30 and len(queries) == n
    small = torch.tensor([q["nll_small"] for q in queries], dtype=torch.float64)
    large = torch.tensor([q["nll_large"] for q in queries], dtype=torch.float64)
    scores = torch.tensor([q["score"] for q in queries], dtype=torch.float64)
    labels = torch.tensor([q["label"] for q in queries])
    assert 0 < report["label_rate"] < 1
    assert labels.tolist() == (small - large > margin).long().tolist()
    assert report["heldout_label_rate"] == pytest.approx(labels.double().mean().item())
    assert report["auc_heldout"] == roc_auc(scores, labels)
    quality = report["quality"]
    assert quality["all_small"] == pytest.approx(small.mean().item())
    assert quality["all_large"] == pytest.approx(large.mean().item())
    # The fixture's large model is better on every held-out query, so any routing lies between the two.
    assert bool((large <= small).all())

    assert [row["target_fraction"] for row in report["fractions"]] == list(REPORT_FRACTIONS)
    for row in report["fractions"]:
        to_large = scores >= row["threshold"]
        assert row["large_fraction"] == round(row["target_fraction"] * n) / n == to_large.double().mean().item()
        routed = torch.where(to_large, large, small).mean().item()
        assert row["routed_quality"] == pytest.approx(routed)
        assert quality["all_large"] - 1e-12 <= row["oracle_quality"] <= routed + 1e-12
        assert routed <= quality["all_small"] + 1e-12
        assert row["random_quality"] == pytest.approx(
            quality["all_small"] + row["large_fraction"] * (quality["all_large"] - quality["all_small"]))
        gap = quality["all_small"] - quality["all_large"]
        assert row["gap_recovered"] == pytest.approx((quality["all_small"] - routed) / gap)
        assert row["random_gap_recovered"] == pytest.approx(row["large_fraction"])

    posthoc = report["posthoc"]
    p = posthoc["num_queries"]
    assert p == min(64, n) and 0 < posthoc["mean_confidence"] <= 1
    for row in posthoc["fractions"]:
        assert row["large_fraction"] == round(row["target_fraction"] * p) / p
        assert quality["all_large"] - 1e-12 <= row["routed_quality"] <= quality["all_small"] + 1e-12

    assert len(router.fraction_thresholds) == 101
    assert router.threshold == pytest.approx(router.threshold_for_fraction(0.4))
    assert report["router"]["threshold"] == router.threshold
    assert router.posthoc_threshold == pytest.approx(router.posthoc_threshold_for_fraction(0.4))
    assert router.metadata["tokenizer_sha256"] == report["tokenizer_sha256"]
    assert router.metadata["data"] == str(setup["data"].resolve()), "data.output of the small run's config.yaml"

    # router=auto wrote the candidate that routes the held-out documents best; the probe read the small tier's
    # hidden states; the fit and held-out queries come from different documents.
    candidates = report["candidates"]
    assert set(candidates) == {"logistic", "probe"}
    best = max(candidates, key=lambda name: candidates[name]["heldout_apgr"])
    assert report["router"]["kind"] == best
    assert (router.hidden is not None) == (best == "probe")
    assert report["probe"]["chosen"]["cv_apgr"] == max(c["cv_apgr"] for c in report["probe"]["candidates"])
    assert 1 <= report["num_heldout_documents"] < report["num_documents"]
    # The token-level deferral rule, fitted on the small tier's answers to fit queries, is in router.json.
    deferral = posthoc["deferral_report"]
    assert router.deferral is not None and len(router.deferral.fraction_thresholds) == 101
    assert router.deferral.threshold == pytest.approx(router.deferral.threshold_for_fraction(0.4))
    assert deferral["num_fit_answers"] == report["num_fit"] and 0 <= deferral["heldout_apgr"] <= 1


def test_next_token_metric_labels_the_greedy_next_tokens_gain(setup) -> None:
    """metric=next_token: each query's quality is the tier's greedy next-token error (0 or 1), the labels its gain."""
    from cascade.calibrate import calibrate, next_token_correct, query_windows
    from moe import load_checkpoint

    report = calibrate(setup["small"], setup["large"], setup["root"] / "next_token", prompt_tokens=K,
                       continuation_tokens=M, num_queries=120, posthoc_queries=8, deferral_queries=0,
                       router="logistic", metric="next_token", device="cpu", verbose=False)
    assert report["quality"]["unit"] == "next-token error" and report["settings"]["metric"] == "next_token"
    windows = query_windows(read_split_documents(setup["data"], "calibration", 120, M + 1), K, M, 0, 120)
    pairs = [windows[q["index"]][0] for q in report["heldout_queries"]]
    for tier in ("small", "large"):
        right = next_token_correct(load_checkpoint(setup[tier]).eval(), pairs, batch_size=4)
        assert [q[f"nll_{tier}"] for q in report["heldout_queries"]] == (1 - right).tolist()
    margin = report["settings"]["margin"]
    assert all(q["label"] == int(q["nll_small"] - q["nll_large"] > margin) for q in report["heldout_queries"])
    assert 0 < report["label_rate"] < 1


def test_mismatched_tokenizers_are_refused(setup) -> None:
    other = setup["root"] / "other_large"
    shutil.copytree(setup["large"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|eos|>"
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = subprocess.run([sys.executable, "-m", "cascade.calibrate", f"small={setup['small']}", f"large={other}",
                             f"out={setup['root'] / 'refused'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert str(setup["small"] / "tokenizer.json") in result.stderr and str(other / "tokenizer.json") in result.stderr
    assert not (setup["root"] / "refused").exists()


def test_argument_and_input_errors(setup, capsys) -> None:
    cases = [
        ([f"small={setup['small']}"], "large: give either large=CKPT .* not neither"),
        ([f"small={setup['small']}", f"large={setup['large']}", "large_endpoint=http://127.0.0.1:9/v1"],
         "not both"),
        ([f"small={setup['small']}", f"large={setup['large']}", "large_model=big"], "large_model: only with"),
        ([f"small={setup['small']}", "large_endpoint=127.0.0.1:9/v1", "large_model=big"], "large_endpoint: .*URL"),
        ([f"small={setup['small']}", "large_endpoint=http://127.0.0.1:9/v1"], "large_model=NAME is required"),
        ([f"small={setup['small']}", "large_endpoint=http://127.0.0.1:9/v1", "large_model=big",
          "large_timeout_s=0"], "large_timeout_s"),
        ([f"small={setup['small']}", "large_endpoint=http://127.0.0.1:9/v1", "large_model=big",
          "large_api_key_env=MOE_TEST_KEY_THAT_IS_NOT_SET"], "large_api_key_env: .*MOE_TEST_KEY_THAT_IS_NOT_SET"),
        # Nothing listens on port 9: refused, naming the key, after the retries and before any model loads.
        ([f"small={setup['small']}", "large_endpoint=http://127.0.0.1:9/v1", "large_model=big"],
         "large_endpoint: http://127.0.0.1:9/v1/models: ConnectError after 3 attempts"),
        ([f"small={setup['small']}", f"large={setup['large']}", "num_queries=many"], "num_queries: expected an integer"),
        ([f"small={setup['small']}", f"large={setup['large']}", "margn=0.1"], "unknown argument 'margn=0.1'"),
        ([f"small={setup['small']}", f"large={setup['large']}", "holdout=1.0"], "holdout"),
        ([f"small={setup['small']}", f"large={setup['large']}", "prompt_tokens=60", "continuation_tokens=8"],
         "prompt_tokens"),
        # A checkpoint outside a run directory needs data=DIR.
        ([f"small={setup['large']}", f"large={setup['large']}"], "data: .*pass data=DIR"),
        ([f"small={setup['large']}", f"large={setup['large']}", f"data={setup['root'] / 'corpus'}"],
         "data: .*tokenizer.json"),
        ([f"small={setup['small']}", f"large={setup['large']}", "margin=50"], "margin: labels are all 0"),
        ([f"small={setup['small']}", f"large={setup['large']}", "router=mlp"], "router must be one of"),
        ([f"small={setup['small']}", f"large={setup['large']}", "metric=exact_match"], "metric must be one of"),
        ([f"small={setup['small']}", "large_endpoint=http://127.0.0.1:9/v1", "large_model=big",
          "metric=next_token"], "metric: next_token compares"),
        ([f"small={setup['small']}", f"large={setup['large']}", "deferral_queries=-1"], "deferral_queries"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["device=cpu", f"out={setup['root'] / 'errors'}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and __import__("re").search(message, err), (message, err)


def test_queries_are_document_windows_taken_in_turns() -> None:
    documents = [list(range(100, 130)), list(range(200, 205)), list(range(300, 400))]
    pairs = make_queries(documents, prompt_tokens=8, continuation_tokens=4, seed=0, num_queries=12)
    assert len(pairs) == 12
    assert [query[0] for query, _ in pairs[:3]] == [100, 200, 300], "every document's beginning first"
    assert pairs[1] == ([200], [201, 202, 203, 204]), "a short document: a short prompt, the continuation kept"
    for query, continuation in pairs:
        assert len(continuation) == 4 and (len(query) >= 4 or query == [200])
        assert query + continuation == list(range(query[0], query[0] + len(query) + 4)), "contiguous"
    starts = sorted(query[0] for query, _ in pairs if 300 <= query[0] < 400)
    ends = sorted(query[0] + len(query) + 4 for query, _ in pairs if 300 <= query[0] < 400)
    assert starts[1:] == ends[:-1], "consecutive, non-overlapping windows"
    assert make_queries(documents, 8, 4, seed=0, num_queries=12) == pairs
