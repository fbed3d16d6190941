"""End-to-end training on a real local Ray: parallel layouts, resume, faults, NaN steps, artifacts.

Every run here is a real `TorchTrainer` with gloo workers on this machine,
fed by the real data pipeline from a small corpus the test writes.
"""

from __future__ import annotations

import math

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from cluster.checkpointing import verify_checkpoint  # noqa: E402
from cluster.diagnostics import GROUPS  # noqa: E402
from cluster.launch import TrainingStopped, train  # noqa: E402
from cluster.metrics import read_metrics  # noqa: E402
from conftest import SESSION_RAY_CPUS  # noqa: E402
from moe.checkpoint import is_sharded_checkpoint, read_weights  # noqa: E402
from train_helpers import ROOT, make_cfg, prometheus_lines, train_losses, write_corpus  # noqa: E402

@pytest.fixture(scope="module")
def ray_session(ray_cluster):
    yield ray_cluster


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "text")
    return root


def test_single_worker_run_learns_and_writes_artifacts(ray_session, corpus, tmp_path) -> None:
    # Two micro-batches of 4 rows per step: the evaluation runs them one at a time too (issue 18, S7), and its
    # loss still equals cluster.evaluate's over whole batches of 8 (below).
    cfg = make_cfg(corpus, tmp_path, "single", "trainer.max_steps=30", "trainer.checkpoint_every=10",
                   "trainer.eval_every=15", "trainer.keep_last=2", "trainer.diagnostics_every=10",
                   "logger.wandb.mode=offline", "logger.ray_metrics=true", "trainer.grad_accum_steps=2",
                   "logger.plots=true")
    summary = train(cfg)
    run_dir = tmp_path / "single"
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb logged offline into the run directory"
    prometheus = prometheus_lines(["ray_moe_train_loss", "ray_moe_expert_max_over_mean_load", "ray_moe_router_entropy"])
    assert any('layer="1"' in line for line in prometheus["ray_moe_expert_max_over_mean_load"])
    assert any('layer="1"' in line for line in prometheus["ray_moe_router_entropy"])
    assert float(prometheus["ray_moe_train_loss"][0].rsplit(" ", 1)[1]) == pytest.approx(
        train_losses(run_dir)[30], rel=1e-5)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) / 5 < 0.7 * losses[1], losses
    assert summary["status"] == "finished" and summary["final_step"] == 30
    assert summary["val_loss"] < losses[1] and summary["tokens_per_s"] > 0
    for name in ("loss_curve.png", "expert_load.png", "routing.png", "diagnostics.png", "summary.json",
                 "config.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert 0 < summary["val_loss_stderr"] < 1
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000020", "step_00000030"], "keep_last=2, no temporary directories left"
    records = read_metrics(run_dir)
    record = [r for r in records if r["kind"] == "train"][-1]
    assert len(record["max_over_mean_load"]) == 2 and len(record["tokens_per_expert"][0]) == 4
    assert all(0 <= m <= 1 for m in record["min_over_mean_load"]) and len(record["min_over_mean_load"]) == 2
    norms = record["grad_norm_by_group"]
    assert set(norms) == set(GROUPS) and norms["experts"] > 0 and norms["router"] > 0 and norms["ffn"] == 0
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(record["grad_norm"], rel=1e-4)
    diagnostics = [r for r in records if r["kind"] == "diagnostics"]
    assert [r["step"] for r in diagnostics] == [10, 20, 30]
    assert diagnostics[0]["topk_change_fraction"] is None, "nothing to compare with at the first probe"
    assert all(len(r["topk_change_fraction"]) == 2 and all(0 <= f <= 1 for f in r["topk_change_fraction"])
               for r in diagnostics[1:])
    assert all(len(r["expert_weight_norm"]) == 2 and len(r["expert_weight_norm"][0]) == 4 for r in diagnostics)
    assert sum(record["tokens_per_expert"][0]) == 8 * 32 * 2, "every token routed to top-2 experts"
    assert len(record["router_entropy"]) == 2 and all(0 < h <= math.log(4) + 1e-6 for h in record["router_entropy"])

    # The final checkpoint is a plain moe checkpoint; cluster.evaluate reads the run's data from its config.
    out = subprocess.run([sys.executable, "-m", "cluster.evaluate", f"checkpoint={run_dir / 'checkpoints' / 'step_00000030'}",
                          "batches=2", "batch_size=8"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(result["val_loss"] - summary["val_loss"]) < 1e-4

    # A fresh run with the same name refuses to overwrite those checkpoints.
    with pytest.raises(ValueError, match="trainer.resume"):
        train(cfg)


# The layout tests' shared settings. Balancing losses are computed per local batch (as in Megatron), so they
# are switched off to compare against the whole-batch run.
LAYOUT_COMMON = ["trainer.max_steps=4", "trainer.checkpoint_every=4", "model.router.aux_loss_coef=0",
                 "model.router.z_loss_coef=0", "trainer.diagnostics_every=2"]


@pytest.fixture(scope="module")
def one_worker_run(ray_session, corpus, tmp_path_factory) -> Path:
    """The single-worker reference run of the layout tests, trained once for all of them (read-only)."""
    root = tmp_path_factory.mktemp("layouts")
    train(make_cfg(corpus, root, "one", *LAYOUT_COMMON))
    return root / "one"


@pytest.mark.parametrize("workers,ep,recompute,compiled,engine,chunk,checkpoints", [
    (2, 2, "full", False, "native", 40, "sharded"),
    pytest.param(2, 1, "none", True, "native", 0, "full", marks=pytest.mark.extended),
    pytest.param(2, 2, "selective", True, "fsdp", 0, "sharded", marks=pytest.mark.extended)])
def test_parallel_layouts_match_single_worker(one_worker_run, corpus, tmp_path, workers: int, ep: int,
                                              recompute: str, compiled: bool, engine: str, chunk: int,
                                              checkpoints: str) -> None:
    """2 workers (expert-parallel or not, FSDP2 or our all-reduce) reproduce 1 worker on the same global batch.

    The expert-parallel run also recomputes its activations
    (`trainer.activation_checkpointing`): the all-to-all runs again in the
    backward pass and must change nothing; and it computes its loss in chunks
    of 40 tokens (`trainer.loss_chunk_tokens`, which do not divide a
    micro-batch). The other one compiles its blocks (`trainer.compile`).
    The expert-parallel runs write sharded checkpoints (each rank its own
    shards, in the background): the same weights as the one worker's file.
    """
    train(make_cfg(corpus, tmp_path, "many", *LAYOUT_COMMON, f"cluster.num_workers={workers}", f"parallel.ep={ep}",
                   f"trainer.activation_checkpointing={recompute}", f"trainer.compile={compiled}",
                   f"trainer.engine={engine}", f"trainer.loss_chunk_tokens={chunk}",
                   f"trainer.checkpoint_format={checkpoints}"))
    one, many = train_losses(one_worker_run), train_losses(tmp_path / "many")
    assert one.keys() == many.keys() == {1, 2, 3, 4}
    for step in one:
        assert abs(one[step] - many[step]) < 1e-5, (step, one[step], many[step])

    written = tmp_path / "many" / "checkpoints" / "step_00000004"
    assert is_sharded_checkpoint(written) == (checkpoints == "sharded") and verify_checkpoint(written) is None
    saves = [r for r in read_metrics(tmp_path / "many") if r["kind"] == "checkpoint"]
    assert [(r["step"], r["format"]) for r in saves] == [(4, checkpoints)] and saves[0]["stall_s"] > 0
    if checkpoints == "sharded":  # the part of the stall spent waiting for a previous write (none here)
        assert 0 <= saves[0]["waited_s"] <= saves[0]["stall_s"]
    a = load_file(str(one_worker_run / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = read_weights(written)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
    # The diagnostics of the sharded run describe the full model: gradient norms by group, expert norms.
    records = {"one": read_metrics(one_worker_run), "many": read_metrics(tmp_path / "many")}
    grads = {name: [r["grad_norm_by_group"] for r in recs if r["kind"] == "train"] for name, recs in records.items()}
    for step, (g_one, g_many) in enumerate(zip(grads["one"], grads["many"]), 1):
        assert g_one.keys() == g_many.keys() == set(GROUPS)
        for group in GROUPS:
            assert g_many[group] == pytest.approx(g_one[group], rel=1e-4, abs=1e-7), (step, group)
    norms = {name: [r["expert_weight_norm"] for r in recs if r["kind"] == "diagnostics"]
             for name, recs in records.items()}
    assert len(norms["one"]) == len(norms["many"]) == 2
    for a_LE, b_LE in zip(norms["one"], norms["many"]):
        assert sum(a_LE, []) == pytest.approx(sum(b_LE, []), rel=1e-5)


def test_distillation_matches_its_definition_and_refuses_another_teacher(one_worker_run, corpus, tmp_path) -> None:
    """trainer.distill: the step-1 distillation loss is the KL of the frozen teacher's and the fresh student's
    distributions on the first batch; train_state.json names the teacher by sha256; resuming with another
    teacher (or none), or a teacher of another tokenizer, is refused before Ray runs anything."""
    import hashlib

    from data_pipeline.loader import CurriculumLoader
    from moe import MoETransformer, load_checkpoint
    from moe.checkpoint import read_model_config
    from moe.distill import distillation_loss
    from moe.model import training_flops_per_token

    teacher = one_worker_run / "checkpoints" / "step_00000004"
    distill = [f"trainer.distill.teacher={teacher}", "trainer.distill.weight=0.7", "trainer.distill.temperature=2",
               "trainer.distill.kind=reverse_kl"]
    cfg = make_cfg(corpus, tmp_path, "distilled", "trainer.max_steps=2", "trainer.checkpoint_every=2", *distill)
    summary = train(cfg)
    run_dir = tmp_path / "distilled"
    records = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and all(r["kd_loss"] > 0 for r in records)

    student_config = read_model_config(run_dir / "checkpoints" / "step_00000002")
    torch.manual_seed(cfg.trainer.seed)  # the workers' initialisation
    student = MoETransformer(student_config)
    batch = next(iter(CurriculumLoader.from_config(cfg.data, global_batch_size=8, data_dir=corpus / "prepared")))
    with torch.no_grad():
        out = student(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["targets"])
        teacher_logits = load_checkpoint(teacher).eval()(batch["input_ids"], doc_ids=batch["doc_ids"],
                                                          ignore_capacity=True).logits
    expected = distillation_loss(out.logits, teacher_logits, batch["targets"], temperature=2.0, kind="reverse_kl")
    assert records[0]["kd_loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert records[0]["loss"] == pytest.approx(out.loss.item(), rel=1e-4), "loss stays the next-token loss"
    # The teacher's forward pass counts in the FLOPs per token (tokens/s and MFU).
    flops = (training_flops_per_token(student_config, 32)
             + training_flops_per_token(read_model_config(teacher), 32) / 3)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["flops_per_token"] == pytest.approx(flops) == records[0]["flops_per_token"]
    assert summary["status"] == "finished"
    state = json.loads((run_dir / "checkpoints" / "step_00000002" / "train_state.json").read_text())
    assert state["distill"] == {"teacher": str(teacher), "weight": 0.7, "temperature": 2.0, "kind": "reverse_kl",
                                "teacher_sha256": hashlib.sha256((teacher / "model.safetensors").read_bytes()
                                                                 ).hexdigest()}

    other = run_dir / "checkpoints" / "step_00000002"
    for overrides, message in (
            ([f"trainer.distill.teacher={other}"], "was trained with .*step_00000004.*this run has .*step_00000002"),
            ([], "was trained with .*step_00000004.*this run has no teacher")):
        resumed = make_cfg(corpus, tmp_path, "distilled", "trainer.max_steps=4", "trainer.resume=auto", *overrides)
        with pytest.raises(ValueError, match=f"trainer.distill.teacher: .*{message}"):
            train(resumed)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"], "nothing changed"
    foreign = tmp_path / "foreign_teacher"
    shutil.copytree(teacher, foreign)
    tokenizer = json.loads((foreign / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|eos|>"
    (foreign / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=f"{foreign / 'tokenizer.json'} differs from the prepared data's "
                                         f"{corpus / 'prepared' / 'tokenizer.json'}"):
        train(make_cfg(corpus, tmp_path, "foreign", f"trainer.distill.teacher={foreign}"))
    assert not (tmp_path / "foreign").exists()


@pytest.mark.extended
def test_distillation_composes_with_parallel_layouts(one_worker_run, corpus, tmp_path) -> None:
    """A distilled run on 2 expert-parallel FSDP2 workers (recomputed and compiled blocks), and one on 2 DeepSpeed
    ZeRO-2 workers, reproduce the distilled single-worker run: the teacher runs on each worker's own micro-batch."""
    teacher = f"trainer.distill.teacher={one_worker_run / 'checkpoints' / 'step_00000004'}"
    train(make_cfg(corpus, tmp_path, "one", *LAYOUT_COMMON, teacher, "trainer.distill.kind=forward_kl"))
    train(make_cfg(corpus, tmp_path, "many", *LAYOUT_COMMON, teacher, "trainer.distill.kind=forward_kl",
                   "cluster.num_workers=2", "parallel.ep=2", "trainer.engine=fsdp",
                   "trainer.activation_checkpointing=selective", "trainer.compile=true"))
    # And DeepSpeed (ZeRO-2, 2 expert-parallel workers): the distillation loss is composed before the engine's
    # backward, so any engine must give the same run (issue 17: untested until now).
    train(make_cfg(corpus, tmp_path, "deepspeed", *LAYOUT_COMMON, teacher, "trainer.distill.kind=forward_kl",
                   "cluster.num_workers=2", "parallel.ep=2", "trainer.engine=deepspeed", "trainer.zero_stage=2"))
    runs = ("one", "many", "deepspeed")
    records = {name: [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"] for name in runs}
    assert len(records["one"]) == len(records["many"]) == len(records["deepspeed"]) == 4
    for a, b, c in zip(records["one"], records["many"], records["deepspeed"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["kd_loss"] - b["kd_loss"]) < 1e-5, (a["step"], a, b)
        assert abs(a["loss"] - c["loss"]) < 1e-5 and abs(a["kd_loss"] - c["kd_loss"]) < 1e-5, (a["step"], a, c)
    assert train_losses(tmp_path / "one") != train_losses(one_worker_run), "the teacher changed the training"


@pytest.mark.extended
def test_resume_and_worker_failure_match_uninterrupted(ray_session, corpus, tmp_path) -> None:
    common = ["trainer.max_steps=6", "trainer.checkpoint_every=2", "data.curriculum.schedule=fixed_linear",
              "data.curriculum.total_curriculum_step=4", "data.curriculum.min_difficulty=20"]
    train(make_cfg(corpus, tmp_path, "straight", *common))
    straight = train_losses(tmp_path / "straight")

    # A crash after step 3 with no restarts allowed fails the run (checkpoint at 2 kept);
    # the same command with trainer.resume=auto continues it.
    crash = ["trainer.debug.kill_rank_at_step=3", "cluster.max_failures=0"]
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="worker"):  # the killed rank's worker-group error
        train(make_cfg(corpus, tmp_path, "resumed", *common, *crash))
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_00000002"]
    train(make_cfg(corpus, tmp_path, "resumed", *common, *crash, "trainer.resume=auto"))
    resumed = train_losses(tmp_path / "resumed")
    assert resumed.keys() == straight.keys()
    for step in straight:
        assert abs(resumed[step] - straight[step]) < 1e-6, (step, resumed[step], straight[step])

    # Kill the worker's process during step 5: Ray Train (max_failures=1) restarts it from
    # the step-4 checkpoint and the run ends where the uninterrupted one does.
    summary = train(make_cfg(corpus, tmp_path, "faulty", *common, "cluster.max_failures=1",
                             "trainer.debug.kill_rank_at_step=4"))
    assert (tmp_path / "faulty" / ".killed_at_4").exists(), "the worker was really killed"
    faulty = train_losses(tmp_path / "faulty")
    assert summary["final_step"] == 6
    assert abs(faulty[6] - straight[6]) < 1e-6, (faulty[6], straight[6])
    assert summary["val_loss"] == pytest.approx(json.loads((tmp_path / "straight" / "summary.json").read_text())["val_loss"],
                                                abs=1e-6)


@pytest.mark.extended
def test_fsdp_worker_failure_resumes_exactly_and_in_another_layout(ray_session, corpus, tmp_path) -> None:
    """FSDP2 with expert parallelism and sharded checkpoints: a worker killed during step 4 restarts from the
    step-2 checkpoint (each rank reads its parts of the model's shards and its optimizer shard) and ends where
    the uninterrupted run does. Its step-4 checkpoint then resumes on one worker with the native engine (the
    model's shards read whole, the optimizer state resharded, cluster/reshard.py) and takes the same next steps
    as the original layout does."""
    common = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "cluster.num_workers=2", "parallel.ep=2",
              "trainer.engine=fsdp", "trainer.checkpoint_format=sharded"]
    straight = train(make_cfg(corpus, tmp_path, "straight", *common))
    faulty = train(make_cfg(corpus, tmp_path, "faulty", *common, "cluster.max_failures=1",
                            "trainer.debug.kill_rank_at_step=3", "trainer.debug.kill_rank=1"))
    assert (tmp_path / "faulty" / ".killed_at_3").exists(), "the worker was really killed"
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "faulty")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert faulty["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)

    more = ["trainer.max_steps=6", "trainer.resume=auto"]
    same = train(make_cfg(corpus, tmp_path, "straight", *common, *more))
    moved = train(make_cfg(corpus, tmp_path, "faulty", *common, *more, "trainer.engine=native", "parallel.ep=1",
                           "cluster.num_workers=1"))
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "faulty")
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in (5, 6):  # step 6's loss follows the AdamW update of step 5, made with the resharded state
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert moved["val_loss"] == pytest.approx(same["val_loss"], abs=1e-5)

    # trainer.init_from: that fsdp ep=2 checkpoint's weights (only) start a native run on one worker. A
    # learning rate of 1e-30 leaves float32 weights bit-equal through an AdamW step (the update lies far
    # below their last bit), so the new run's step-1 checkpoint must hold exactly the weights it started from.
    source = tmp_path / "straight" / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match=r"trainer\.init_from: .*embed_tokens\.weight"):
        train(make_cfg(corpus, tmp_path, "refit", f"trainer.init_from={source}", "model.hidden_size=64"))
    refit = ["trainer.checkpoint_every=1", "trainer.lr=1e-30", f"trainer.init_from={source}"]
    train(make_cfg(corpus, tmp_path, "refit", "trainer.max_steps=1", *refit))
    started = tmp_path / "refit" / "checkpoints" / "step_00000001"
    assert is_sharded_checkpoint(source) and not is_sharded_checkpoint(started)  # init_from reads shards whole
    assert_same_tensors(read_weights(started), read_weights(source))
    steps = {k: v for k, v in load_file(str(started / "optimizer_rank0.safetensors")).items() if k.endswith("::step")}
    assert steps and all(float(v) == 1.0 for v in steps.values()), "a fresh AdamW state, not the source's"
    assert json.loads((started / "train_state.json").read_text())["step"] == 1
    # A later resume=auto continues the new run's own checkpoint (here on 2 workers with fsdp and ep=2: the
    # one-worker optimizer state resharded); init_from is not applied again.
    train(make_cfg(corpus, tmp_path, "refit", "trainer.max_steps=2", "trainer.resume=auto", *refit,
                   "cluster.num_workers=2", "parallel.ep=2", "trainer.engine=fsdp"))
    records = [r for r in read_metrics(tmp_path / "refit") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    steps = {k: v for k, v in load_file(str(tmp_path / "refit" / "checkpoints" / "step_00000002" /
                                             "optimizer_rank0.safetensors")).items() if k.endswith("::step")}
    assert all(float(v) == 2.0 for v in steps.values())


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.extended
def test_nan_steps_are_skipped_then_stop_the_run(ray_session, corpus, tmp_path) -> None:
    summary = train(make_cfg(corpus, tmp_path, "skips", "trainer.max_steps=5", "trainer.checkpoint_every=5",
                             "trainer.debug.nan_loss_at_steps=[1,2]"))
    assert summary["bad_steps"] == 2 and summary["status"] == "finished"
    records = [r for r in read_metrics(tmp_path / "skips") if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [False, True, True, False, False]

    cfg = make_cfg(corpus, tmp_path, "diverges", "trainer.max_steps=8", "trainer.checkpoint_every=2",
                   "trainer.max_bad_steps=2", "trainer.debug.nan_loss_at_steps=[3,4,5]")
    with pytest.raises(TrainingStopped, match="2 consecutive steps"):
        train(cfg)
    checkpoints = [p.name for p in (tmp_path / "diverges" / "checkpoints").iterdir()]
    assert checkpoints == ["step_00000002"], "the last good checkpoint is kept, nothing after it"


@pytest.mark.extended
@pytest.mark.parametrize("experiment", sorted({p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
                                              - {"mixtral_tiny"}))  # mixtral_tiny: every other test trains it
def test_experiment_smoke(ray_session, corpus, tmp_path, experiment: str) -> None:
    """Each preset composes and trains one step with its size shrunk by overrides."""
    shrink = ["cluster.address=null", "cluster.num_workers=1", "cluster.use_gpu=false", "cluster.cpus_per_worker=1",
              "parallel.ep=1", "trainer.dtype=float32", "trainer.global_batch_size=8", "data.vocab_size=320",
              "model.num_heads=2", "model.num_kv_heads=1", "trainer.max_steps=1",
              "model.attention_backend=sdpa"]  # FlexAttention has no CPU backward: mixtral_small's flex is for GPUs
    summary = train(make_cfg(corpus, tmp_path, experiment, *shrink, experiment=experiment))
    assert summary["final_step"] == 1 and summary["status"] == "finished"


def test_local_resources_are_checked_before_training(ray_session, corpus, tmp_path) -> None:
    """A request the local Ray cannot hold (it would wait forever) fails with the key named."""
    assert ray.cluster_resources()["CPU"] == SESSION_RAY_CPUS
    cfg = make_cfg(corpus, tmp_path, "too_big", "cluster.num_workers=2", f"cluster.cpus_per_worker={SESSION_RAY_CPUS - 1}")
    with pytest.raises(ValueError, match="cluster.cpus_per_worker"):
        train(cfg)
    cfg = make_cfg(corpus, tmp_path, "no_gpu", "cluster.use_gpu=true")
    with pytest.raises(ValueError, match="cluster.use_gpu"):
        train(cfg)


def test_the_session_ray_tells_its_processes_its_address(ray_session) -> None:
    """The session's Ray is started as `moe.train` and `moe.serve` start theirs (cluster.runtime.init_local_ray):
    its workers inherit RAY_ADDRESS, its own GCS, so that Ray's state API in them (Ray Train's placement-group
    cleaner) never looks for local Rays by itself; the driver's environment is left as it was (a CLI a test
    starts must not join this Ray)."""
    @ray.remote(num_cpus=0)
    def address_seen_by_a_worker() -> str:
        return os.environ.get("RAY_ADDRESS")

    gcs = ray.get_runtime_context().gcs_address
    assert ray.get(address_seen_by_a_worker.remote()) == gcs
    assert os.environ.get("RAY_ADDRESS") != gcs and os.environ.get("RAY_GCS_SERVER_PORT") != gcs.rsplit(":", 1)[1]
