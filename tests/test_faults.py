"""The fault matrix of `python -m moe.train`: each fault injected through the real CLI and a real local Ray.

Every case asserts the outcome a user sees: the exit status, one `error:` line
naming the culprit (no traceback), no Ray process of the run left alive, and
every file that existed before unchanged (the source corpus, earlier
checkpoints, an unrelated directory, hashed before and after).

To stay inside the test budget the cases share one corpus and one prepared
directory, and the training runs build on each other: a run that prunes
checkpoints, a resume after pruning, resumes past damaged checkpoints, an
explicit older checkpoint, a SIGKILLed driver and a Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from train_helpers import DEBUG_OVERRIDES, ROOT, train_losses, write_corpus

pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the roots (a missing root hashes to nothing)."""
    out = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Run:
    """One `python -m moe.train` process; records its descendants while it runs."""

    def __init__(self, args: list[str], cwd: Path, *, ignore_sigint: bool = False) -> None:
        # ignore_sigint: start as a script's background job does (SIGINT inherited as ignored)
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
        self.proc = subprocess.Popen([sys.executable, "-m", "moe.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"})
        self.descendants: dict[int, float] = {}

    def poll_descendants(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self.descendants.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def wait_for(self, predicate, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.poll_descendants()
            assert self.proc.poll() is None, f"the run ended early:\n{self.proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the run"
            time.sleep(0.3)

    def finish(self, timeout_s: float = 240) -> tuple[int, str, str]:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll_descendants()
            time.sleep(0.3)
        out, err = self.proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return self.proc.returncode, out, err

    def survivors(self, grace_s: float = 20.0) -> list[str]:
        """Descendants still alive `grace_s` after the driver ended (their command lines)."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = []
            for pid, created in self.descendants.items():
                try:
                    process = psutil.Process(pid)
                    if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(" ".join(process.cmdline())[:120])
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    write_corpus(root / "corpus" / "text")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "notes.txt").write_text("keep me\n")
    return {"root": root, "corpus": root / "corpus" / "text", "prepared": root / "prepared",
            "runs": root / "runs", "unrelated": root / "unrelated"}


def base_args(world: dict[str, Path], name: str, *extra: str) -> list[str]:
    return ["+experiment=mixtral_tiny", *DEBUG_OVERRIDES, f"data.sources=[{world['corpus']}]",
            f"data.output={world['prepared']}", f"trainer.run_root={world['runs']}", f"name={name}", *extra]


def run_cli(world: dict[str, Path], name: str, *extra: str, timeout_s: float = 240) -> tuple[int, str, str, Run]:
    run = Run(base_args(world, name, *extra), world["root"])
    code, out, err = run.finish(timeout_s)
    return code, out, err, run


def assert_refused(code: int, err: str, *names: str) -> str:
    """Exit 1 with exactly one `error:` line that names every culprit, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


# Ray Train's controller logs, with its traceback, a resource request to Ray's autoscaling coordinator that
# timed out (5 s: the coordinator's actor starting on an overloaded CPU) and goes on; Ray's message says it is
# safe to ignore when transient. These lines open and close such a warning (each prefixed by the controller).
RAY_TRANSIENT = ("Failed to send resource request", "GetTimeoutError")


def tracebacks(err: str) -> list[str]:
    """The tracebacks in a run's stderr (their first lines), Ray Train's transient warning above excepted (up
    to its closing line, 40 lines at most)."""
    found, transient_left = [], 0
    for line in err.splitlines():
        if RAY_TRANSIENT[0] in line:
            transient_left = 40
        elif transient_left and RAY_TRANSIENT[1] in line:
            transient_left = 0
        elif "Traceback" in line and not transient_left:
            found.append(line)
        transient_left = max(0, transient_left - 1)
    return found


def guarded(world: dict[str, Path], *extra: Path) -> dict[str, str]:
    return tree_hashes(world["corpus"], world["unrelated"], *extra)


# 1. Values that used to be accepted silently or to fail inside Ray: refused before Ray starts.
@pytest.mark.parametrize("override,key", [
    ("trainer.min_lr_ratio=-2", "trainer.min_lr_ratio"),
    ("trainer.grad_clip=-1", "trainer.grad_clip"),
    ("trainer.weight_decay=-1", "trainer.weight_decay"),
    ("trainer.beta1=1.5", "trainer.beta1"),
    ("trainer.activation_checkpointing=everything", "trainer.activation_checkpointing"),
    ("model.attention_backend=flex", "model.attention_backend"),  # no CPU backward in torch's FlexAttention
    ("cluster.num_cpus=0", "cluster.num_cpus"),
    ("cluster.dashboard_port=99999", "cluster.dashboard_port"),
    ("data.validation_fraction=0", "data.validation_fraction"),
    ("data.curriculum.metric=perplexity data.curriculum.schedule=fixed_linear", "data.score_with"),
])
def test_bad_values_are_refused_before_ray(world, override: str, key: str) -> None:
    before = guarded(world)
    started = time.monotonic()
    code, _, err, run = run_cli(world, "bad_value", *override.split(), timeout_s=120)
    assert_refused(code, err, key)
    assert "Ray dashboard" not in err and not run.survivors(grace_s=2), "Ray never started"
    assert time.monotonic() - started < 60
    assert guarded(world) == before
    assert not (world["runs"] / "bad_value").exists(), "nothing was written for a refused run"


def test_a_dashboard_port_in_use_is_refused_before_ray(world) -> None:
    """A second local run on the dashboard port of a first (here a socket listening on it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err, run = run_cli(world, "port_in_use", f"cluster.dashboard_port={port}", timeout_s=120)
    line = assert_refused(code, err, "cluster.dashboard_port", f"127.0.0.1:{port} is in use")
    assert "Ray dashboard" not in err and not run.survivors(grace_s=2), line
    assert not (world["runs"] / "port_in_use").exists()


# 2. Pruned checkpoints, then resume=auto (Ray Train's saved state used to list the pruned ones).
@pytest.mark.extended
@pytest.mark.own_ray
def test_resume_after_pruning(world) -> None:
    code, _, err, run = run_cli(world, "line", "trainer.max_steps=30", "trainer.checkpoint_every=10",
                                "trainer.keep_last=2")
    assert code == 0, err[-3000:]
    assert not run.survivors(), "no Ray process outlives a finished run"
    ckpts = world["runs"] / "line" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000020", "step_00000030"]
    before = guarded(world, ckpts / "step_00000020")
    code, out, err, run = run_cli(world, "line", "trainer.max_steps=40", "trainer.checkpoint_every=10",
                                  "trainer.keep_last=3", "trainer.resume=auto")
    assert code == 0, err[-3000:]
    assert f"resuming from {ckpts / 'step_00000030'}" in out + err
    assert sorted(train_losses(world["runs"] / "line")) == list(range(1, 41))
    assert guarded(world, ckpts / "step_00000020") == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000020", "step_00000030", "step_00000040"]


# 3. Damaged checkpoints: resume=auto skips them newest first, naming the file; nothing is deleted.
@pytest.mark.extended
@pytest.mark.own_ray
def test_resume_skips_damaged_checkpoints(world) -> None:
    ckpts = world["runs"] / "line" / "checkpoints"
    if not (ckpts / "step_00000040").is_dir():
        pytest.skip("needs the checkpoints of test_resume_after_pruning")
    weights = ckpts / "step_00000040" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (ckpts / "step_00000030" / "train_state.json").unlink()  # incomplete
    damaged = tree_hashes(ckpts / "step_00000040", ckpts / "step_00000030")
    before = guarded(world, ckpts / "step_00000020")

    # An explicit path to a damaged checkpoint is refused before Ray starts.
    code, _, err, run = run_cli(world, "line", f"trainer.resume={ckpts / 'step_00000040'}", timeout_s=120)
    assert_refused(code, err, "trainer.resume", "model.safetensors")
    assert "Ray dashboard" not in err

    code, out, err, run = run_cli(world, "line", "trainer.max_steps=30", "trainer.checkpoint_every=10",
                                  "trainer.keep_last=3", "trainer.resume=auto")
    assert code == 0, err[-3000:]
    text = out + err
    assert "skipping damaged checkpoint step_00000040" in text and "model.safetensors has 1000 bytes" in text
    assert "skipping damaged checkpoint step_00000030" in text and "train_state.json is missing" in text
    assert f"resuming from {ckpts / 'step_00000020'}" in text
    assert guarded(world, ckpts / "step_00000020") == before
    aside = list((ckpts / "superseded").glob("*"))
    assert len(aside) == 1, "the damaged checkpoints are set aside, not deleted"
    moved = {str(p).replace(str(aside[0]), str(ckpts)): h for p, h in
             tree_hashes(aside[0] / "step_00000040", aside[0] / "step_00000030").items()}
    assert moved == damaged
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000030"]
    assert json.loads((ckpts / "step_00000030" / "train_state.json").read_text())["step"] == 30


# 4. An explicit older checkpoint wins over newer ones (Ray's saved state used to override it).
@pytest.mark.extended
@pytest.mark.own_ray
def test_explicit_resume_wins(world) -> None:
    ckpts = world["runs"] / "line" / "checkpoints"
    if not (ckpts / "step_00000030").is_dir():
        pytest.skip("needs the checkpoints of the earlier cases")
    code, out, err, run = run_cli(world, "line", "trainer.max_steps=25", "trainer.checkpoint_every=5",
                                  "trainer.keep_last=3", f"trainer.resume={ckpts / 'step_00000020'}")
    assert code == 0, err[-3000:]
    text = out + err
    assert f"resuming from {ckpts / 'step_00000020'}" in text and "at step 20" in text
    assert "moved the 1 newer checkpoint(s) (step_00000030)" in text
    assert sorted(train_losses(world["runs"] / "line")) == list(range(1, 26))


# 5. A SIGKILLed driver leaves no Ray process behind, and the run resumes from its newest checkpoint.
@pytest.mark.extended
@pytest.mark.own_ray
def test_driver_sigkill_leaves_nothing_and_resumes(world) -> None:
    run = Run(base_args(world, "killed", "trainer.max_steps=2000", "trainer.checkpoint_every=5"), world["root"])
    ckpts = world["runs"] / "killed" / "checkpoints"
    run.wait_for(lambda: (ckpts / "step_00000005").is_dir(), timeout_s=180)
    run.poll_descendants()
    assert any("raylet" in _cmdline(pid) for pid in run.descendants), "the run started its own Ray"
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(timeout=10)
    survivors = run.survivors(grace_s=20)
    assert not survivors, f"Ray processes outlived the killed driver: {survivors}"
    newest = sorted(p.name for p in ckpts.glob("step_*"))[-1]
    code, out, err, run = run_cli(world, "killed", f"trainer.max_steps={int(newest[5:]) + 2}",
                                  "trainer.checkpoint_every=5", "trainer.resume=auto")
    assert code == 0, err[-3000:]
    assert f"resuming from {ckpts / newest}" in out + err


# 6. Ctrl-C: a clean stop that says where the run is and how to resume it.
@pytest.mark.own_ray
def test_ctrl_c_names_step_checkpoint_and_command(world) -> None:
    # Started with SIGINT ignored, as a background job of a script (CI) inherits it: Ctrl-C must still work.
    run = Run(base_args(world, "interrupted", "trainer.max_steps=2000", "trainer.checkpoint_every=5"),
              world["root"], ignore_sigint=True)
    ckpts = world["runs"] / "interrupted" / "checkpoints"
    run.wait_for(lambda: (ckpts / "step_00000005").is_dir(), timeout_s=180)
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
    code, _, err = run.finish(timeout_s=60)
    assert code == 130, err[-3000:]
    line = next(line for line in err.splitlines() if "interrupted at step" in line)
    assert "latest checkpoint: " + str(ckpts / "step_") in line
    assert "trainer.resume=auto" in line and "name=interrupted" in line
    assert not tracebacks(err) and "multiple active Ray instances" not in err, err[-3000:]
    assert not run.survivors(), "no Ray process outlives Ctrl-C"


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


# 7. Prepared data that cannot feed the run: found by the driver before Ray starts, naming the file or key.
@pytest.mark.extended
def test_bad_prepared_data_is_refused_before_ray(world) -> None:
    if not (world["prepared"] / "manifest.json").is_file():  # this case alone: prepare (then refuse a huge batch)
        run_cli(world, "prepare_only", "trainer.global_batch_size=4096", timeout_s=120)
    copy = world["root"] / "prepared_copy"
    cases = []
    # A damaged shard (a record batch's bytes flipped), with the default data.on_corrupt=error.
    shutil.copytree(world["prepared"], copy)
    shard = sorted(copy.glob("train-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cases.append((["data.output=" + str(copy)], [shard.name]))
    # A validation split smaller than one global batch.
    cases.append((["trainer.global_batch_size=4096"], ["data.validation_fraction"]))
    before = guarded(world, world["prepared"])
    for extra, names in cases:
        code, _, err, run = run_cli(world, "bad_data", *extra, timeout_s=120)
        assert_refused(code, err, *names)
        assert "Ray dashboard" not in err, "refused before Ray started"
    # A tokenizer.json that is not the manifest's.
    shutil.copyfile(world["prepared"] / "manifest.json", copy / "tokenizer.json")
    shutil.copyfile(world["prepared"] / "train-00000.arrow", shard)
    code, _, err, run = run_cli(world, "bad_data", "data.output=" + str(copy), timeout_s=120)
    assert_refused(code, err, "tokenizer")
    assert guarded(world, world["prepared"]) == before


# 8. A whole node lost mid-run (issue 20), on a simulated 3-node Ray cluster: benchmarks/drill_cluster.py's case.
@pytest.mark.extended
@pytest.mark.own_ray
def test_a_lost_node_costs_no_step_and_no_checkpoint(tmp_path) -> None:
    """A 2-worker ep=2 run, one worker per node (`cluster.worker_resources`); one node removed past a checkpoint
    and a replacement added: the run resumes from the newest checkpoint and ends with the reference's losses.
    Run as its own process: it starts its own Ray cluster, which must not meet another local Ray."""
    out = tmp_path / "drill.json"
    result = subprocess.run([sys.executable, "benchmarks/drill_cluster.py", "--cases", "training", "--steps", "24",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.is_file(), result.stdout[-2000:] + result.stderr[-3000:]
    (case,) = json.loads(out.read_text())["results"]
    assert case["ok"], case
    assert case["exit_code"] == 0 and case["final_step"] == 24 and case["losses_equal_reference"]
    assert case["val_loss"] == case["reference_val_loss"] and not case["checkpoints_damaged"]
    assert case["resumed_from_step"] % 10 == 0 and case["resumed_from_step"] <= case["removed_after_step"]
    assert case["removed_node_processes"] > 0 and not case["removed_node_processes_left"]
    assert any(case["removed_node"] in line for line in case["driver_lines"]), "the terminal names the lost node"
    assert any("resumed from" in line for line in case["driver_lines"])
    assert case["dashboard"] is None or case["dashboard_status_after_recovery"] == 200


@pytest.mark.extended
@pytest.mark.own_ray
def test_a_lost_node_during_ray_data_preparation_changes_no_byte(tmp_path) -> None:
    """data.engine=ray on a simulated 3-node cluster, a worker node removed while a task runs there: Ray Data
    reruns it and the prepared directory is byte for byte the local engine's (benchmarks/drill_cluster.py)."""
    out = tmp_path / "drill.json"
    result = subprocess.run([sys.executable, "benchmarks/drill_cluster.py", "--cases", "data", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.is_file(), result.stdout[-2000:] + result.stderr[-3000:]
    (case,) = json.loads(out.read_text())["results"]
    assert case["ok"], case
    assert case["node_removed"] and case["tasks_running_there"] > 0 and case["exit_code"] == 0
    assert case["byte_identical_to_local"] and not case["removed_node_processes_left"]
