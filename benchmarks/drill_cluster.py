"""Node loss on a simulated multi-node Ray cluster, on one machine: what a lost node costs the cascade service.

    python benchmarks/drill_cluster.py [--cases training,serving] [--seconds 60] [--concurrency 16]
                                       [--steps 30] [--out runs/drill_cluster.json]

`ray.cluster_utils.Cluster` starts a head and two worker nodes on this machine,
each with its own raylet and object store, and custom resources that pin the
tiers: `drill_small` on one worker node, `drill_large` on the other
(`tiers.<name>.resources`). The cascade (two tiny random-weight tiers over real
checkpoints) is deployed on it through `serving.app.checked_app`, as
`moe.serve address=...` deploys it; Serve's proxy runs on the head only.

Case `serving`: `--concurrency` clients ask for the large tier for `--seconds`;
after a third of the time the large tier's node is removed (`remove_node`
kills its raylet and every process on it); after two thirds a node offering
`drill_large` is added back. Reported: the answers (ok, `degraded: true`, 5xx,
connection errors), whether any process of the removed node is left running,
and how long after the node came back the large tier answered again.

Case `training`: head plus two worker nodes, each offering one `drill_trainer`
resource; a 2-worker `parallel.ep=2` run of a tiny mixtral_tiny asks for one
per worker (`cluster.worker_resources`), so its ranks sit on different nodes,
and may restart its worker group (`cluster.max_failures=2`). The same command
first runs uninterrupted (the reference). Then, once the run has written a
checkpoint and gone a few steps past it, one worker node is removed; a few
seconds later a replacement node offering `drill_trainer` is added. Ray Train
restarts the group from the newest checkpoint (`cluster.worker.start_checkpoint`)
and the run reaches `--steps`. Reported: the steps repeated, whether every
step's loss and the final validation loss equal the reference's, whether every
checkpoint on disk matches its recorded sha256, the seconds from the removal
to the first step trained again, what the driver printed about it, and
whether any process of the removed node is left running.

Case `data`: head plus two worker nodes (1 CPU each); `python -m
data_pipeline.prepare data.engine=ray data.ray_address=...` tokenizes and
scores (perplexity under a tiny random model) a small corpus in many small
chunks as Ray Data tasks. As soon as a task runs on the second worker node,
that node is removed; two seconds later a replacement joins. Ray Data retries
the lost tasks. Reported: the exit code, whether the prepared directory is
byte for byte the one the local engine writes, and the seconds it took.

One JSON line per case, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_tiers(root: Path) -> dict[str, Path]:
    """Two random-weight tiers over one trained tokenizer, and a router that sends long prompts to large."""
    from serving.testing import tiny_pair

    texts = ["the expert router sends each token to two of eight experts", "a mixture of experts model"] * 20
    return tiny_pair(root, texts, split=12)


def node_processes(node_id: str) -> list[int]:
    """The pids of the Ray workers and actors the state API places on a node."""
    from ray.util.state import list_workers

    return [w.pid for w in list_workers(filters=[("node_id", "=", node_id)], limit=1000, raise_on_missing_output=False)
            if w.pid]


# A tiny mixtral_tiny (tests/train_helpers.py's sizes): two ranks of ep=2 train it in well under a second a step.
TRAIN_OVERRIDES = [
    "+experiment=mixtral_tiny", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_seq_len=32", "model.experts.num_experts=4", "model.experts.hidden_size=32",
    "data.seq_len=32", "data.vocab_size=320", "data.validation_fraction=0.1", "data.prefetch=1",
    "data.text_column=content",
    "trainer.global_batch_size=8", "trainer.warmup_steps=2", "trainer.lr=0.01", "trainer.eval_batches=2",
    "logger.wandb.mode=disabled", "logger.ray_metrics=false", "logger.progress_bar=false",
    "cluster.num_workers=2", "parallel.ep=2", "cluster.cpus_per_worker=1", "cluster.max_failures=2",
    "+cluster.worker_resources.drill_trainer=1", "trainer.keep_last=100",
]


def training_case(steps: int, checkpoint_every: int = 10) -> dict:
    import os
    import re
    import subprocess

    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from cluster.checkpointing import list_checkpoints, verify_checkpoint
    from cluster.metrics import read_metrics
    from data_pipeline.testing import make_corpus

    root = Path(tempfile.mkdtemp(prefix="drill_training_"))
    make_corpus(root / "corpus", num_text=40)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"drill_trainer": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    context = ray.init(address=cluster.address, log_to_driver=False)  # the drill's own view (state API)
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else None
    result: dict = {"case": "training", "steps": steps, "checkpoint_every": checkpoint_every}

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "moe.train", *TRAIN_OVERRIDES, f"data.sources=[{root / 'corpus'}]",
                f"data.output={root / 'prepared'}", f"trainer.run_root={root / 'runs'}", f"name={name}",
                f"trainer.max_steps={steps}", f"trainer.checkpoint_every={checkpoint_every}",
                f"cluster.address={cluster.address}"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    try:
        started = time.monotonic()
        reference = subprocess.run(command("reference"), cwd=root, env=env, capture_output=True, text=True,
                                   timeout=900)
        result["reference_s"] = round(time.monotonic() - started, 1)
        if reference.returncode != 0:
            result.update(ok=False, error="the reference run failed", stderr_tail=reference.stderr[-3000:])
            return result
        run_dir = root / "runs" / "drill"
        log = open(root / "drill.log", "w")
        proc = subprocess.Popen(command("drill"), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        remove_at_step = checkpoint_every + 3  # past a checkpoint: the steps since are trained again
        while not any(r["kind"] == "train" and r["step"] >= remove_at_step for r in read_metrics(run_dir)):
            if proc.poll() is not None or time.monotonic() - started > 900:
                raise RuntimeError(f"the drill run ended or stalled before step {remove_at_step}")
            time.sleep(0.1)
        lost = nodes[1]
        lost_pids = node_processes(lost.node_id)
        last_step = max(r["step"] for r in read_metrics(run_dir) if r["kind"] == "train")
        removed_at = time.monotonic()
        cluster.remove_node(lost)  # its raylet and every process on it are killed
        time.sleep(3)
        cluster.add_node(num_cpus=1, resources={"drill_trainer": 1})
        added_at = time.monotonic()
        resumed_step = recovered_at = dashboard_status = None
        while proc.poll() is None:  # the restarted group logs where it resumed, then trains the next step again
            if resumed_step is None:
                found = re.search(r"resumed from \S+ at step (\d+)", (root / "drill.log").read_text())
                resumed_step = int(found.group(1)) if found else None
            elif recovered_at is None and any(r["kind"] == "train" and r["step"] == resumed_step + 1
                                              for r in read_metrics(run_dir)):
                recovered_at = time.monotonic()
                dashboard_status = _http_status(f"{dashboard}/api/version") if dashboard else None
            time.sleep(0.1)
        log.close()
        output = (root / "drill.log").read_text()
        ref_dir = root / "runs" / "reference"
        ref_losses = {r["step"]: r["loss"] for r in read_metrics(ref_dir) if r["kind"] == "train"}
        losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}  # the last of each
        ref_val = [r["val_loss"] for r in read_metrics(ref_dir) if r["kind"] == "eval"]
        val = [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"]
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        damaged = {c.name: problem for c in checkpoints if (problem := verify_checkpoint(c)) is not None}
        # What the head's terminal said: Ray Train names the dead node, starts a new group, the workers resume.
        restart_lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.splitlines()
                         if any(words in line for words in ("node has died", "Attempting to start training worker",
                                                            "resumed from"))]
        result.update({
            "exit_code": proc.returncode, "removed_node": lost.node_id, "removed_after_step": last_step,
            "resumed_from_step": resumed_step, "steps_repeated": None if resumed_step is None
            else last_step - resumed_step,
            "recovery_s": None if recovered_at is None else round(recovered_at - removed_at, 1),
            "replacement_added_after_s": round(added_at - removed_at, 1),
            "final_step": max(losses) if losses else None,
            "losses_equal_reference": bool(losses) and losses == ref_losses,
            "max_loss_diff": max((abs(losses[s] - ref_losses[s]) for s in ref_losses if s in losses), default=None),
            "val_loss": val[-1] if val else None, "reference_val_loss": ref_val[-1] if ref_val else None,
            "checkpoints": len(checkpoints), "checkpoints_damaged": damaged,
            "removed_node_processes": len(lost_pids),
            "removed_node_processes_left": [pid for pid in lost_pids if psutil.pid_exists(pid)],
            "driver_lines": list(dict.fromkeys(restart_lines))[:8],
            "dashboard": dashboard, "dashboard_status_after_recovery": dashboard_status,
        })
        result["ok"] = bool(proc.returncode == 0 and result["losses_equal_reference"] and max(losses) == steps
                            and not damaged and resumed_step is not None and lost_pids
                            and not result["removed_node_processes_left"] and val == ref_val)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def data_case() -> dict:
    import hashlib
    import os
    import subprocess

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    import moe
    from data_pipeline.testing import make_corpus

    root = Path(tempfile.mkdtemp(prefix="drill_data_"))
    make_corpus(root / "corpus", num_text=120)
    config = moe.ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             max_seq_len=64, experts=moe.ExpertsConfig(num_experts=4, hidden_size=32))
    moe.save_checkpoint(moe.MoETransformer(config), root / "scorer")
    common = [f"data.sources=[{root / 'corpus'}]", "data.text_column=content", "data.vocab_size=320",
              "data.chunk_bytes=4096", "data.record_batch_bytes=1024", "data.shard_max_bytes=8192",
              f"data.score_with={root / 'scorer'}", "data.score_seq_len=64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def prepare(output: str, *extra: str, wait: bool = True):
        command = [sys.executable, "-m", "data_pipeline.prepare", *common, f"data.output={root / output}", *extra]
        if wait:
            return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def tree(path: Path) -> dict[str, str]:
        return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(path.rglob("*")) if f.is_file()}

    result: dict = {"case": "data"}
    local = prepare("local", "data.engine=local")
    if local.returncode != 0:
        return {**result, "ok": False, "error": "the local preparation failed", "stderr": local.stderr[-2000:]}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        started = time.monotonic()
        proc = prepare("on_ray", "data.engine=ray", f"data.ray_address={cluster.address}", wait=False)
        lost, removed_at, tasks_running = nodes[1], None, 0
        while proc.poll() is None and removed_at is None:
            running = list_tasks(filters=[("node_id", "=", lost.node_id), ("state", "=", "RUNNING")],
                                 raise_on_missing_output=False)
            if running:
                tasks_running = len(running)
                lost_pids = node_processes(lost.node_id)
                removed_at = time.monotonic()
                cluster.remove_node(lost)
                time.sleep(2)
                cluster.add_node(num_cpus=1)
            time.sleep(0.05)
        output = proc.communicate(timeout=900)[0]
        identical = proc.returncode == 0 and tree(root / "on_ray") == tree(root / "local")
        import psutil

        result.update({
            "exit_code": proc.returncode, "seconds": round(time.monotonic() - started, 1),
            "node_removed": removed_at is not None, "removed_after_s": None if removed_at is None
            else round(removed_at - started, 1), "tasks_running_there": tasks_running,
            "removed_node_processes_left": [] if removed_at is None
            else [pid for pid in lost_pids if psutil.pid_exists(pid)],
            "byte_identical_to_local": identical, "files": len(tree(root / "local")),
            "output_tail": output[-1500:] if proc.returncode else "",
        })
        result["ok"] = bool(identical and removed_at is not None and not result["removed_node_processes_left"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def _http_status(url: str) -> Optional[int]:
    import requests

    try:
        return requests.get(url, timeout=10).status_code
    except requests.RequestException:
        return None


def serving_case(seconds: float, concurrency: int) -> dict:
    import psutil
    import ray
    import requests
    from hydra import compose, initialize_config_dir
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.app import checked_app
    from serving.config import register_configs

    register_configs()
    root = Path(tempfile.mkdtemp(prefix="drill_cluster_"))
    tiers = tiny_tiers(root)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"drill_small": 1})
    large_node = cluster.add_node(num_cpus=1, resources={"drill_large": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    result: dict = {"case": "serving", "seconds": seconds, "concurrency": concurrency}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="serve", overrides=[
                f"small={tiers['small']}", f"large={tiers['large']}", f"routing.router={tiers['router']}",
                f"address={cluster.address}", "tiers.small.num_cpus=0.5", "tiers.large.num_cpus=0.5",
                "+tiers.small.resources.drill_small=1", "+tiers.large.resources.drill_large=1",
                "routing.large_timeout_s=5", "routing.max_tokens_limit=8"])
        serve.run(checked_app(cfg, ray.cluster_resources(), check_fit=False), name="cascade", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        large_pids = node_processes(large_node.node_id)
        outcomes: list[tuple[float, str]] = []  # (time, "large" | "degraded" | "5xx" | "connection")
        start = time.monotonic()
        events: dict[str, float] = {}

        def client() -> None:
            while time.monotonic() - start < seconds:
                at = time.monotonic() - start
                try:
                    response = requests.post(url, json={"model": "large", "prompt": "the expert router sends",
                                                        "max_tokens": 4, "temperature": 0}, timeout=30)
                except requests.RequestException:
                    outcomes.append((at, "connection"))
                    continue
                if response.status_code >= 500:
                    outcomes.append((at, "5xx"))
                elif response.status_code != 200:
                    outcomes.append((at, f"http_{response.status_code}"))
                else:
                    body = response.json()
                    outcomes.append((at, "degraded" if body["degraded"] else body["routed_to"]))

        with ThreadPoolExecutor(concurrency) as pool:  # the node changes run here: Ray's nodes need the main thread
            futures = [pool.submit(client) for _ in range(concurrency)]
            time.sleep(seconds / 3)
            events["removed_at"] = time.monotonic() - start
            cluster.remove_node(large_node)
            time.sleep(max(0.0, seconds * 2 / 3 - (time.monotonic() - start)))
            events["added_at"] = time.monotonic() - start
            cluster.add_node(num_cpus=1, resources={"drill_large": 1})
            for future in futures:
                future.result()
        kinds = [kind for _, kind in outcomes]
        back = [at for at, kind in outcomes if kind == "large" and at > events["added_at"]]
        result.update({
            "requests": len(outcomes), "answered_by_large": kinds.count("large"),
            "degraded": kinds.count("degraded"), "5xx": kinds.count("5xx"),
            "connection_errors": kinds.count("connection"),
            "other": sorted({k for k in kinds if k not in ("large", "degraded", "5xx", "connection", "small")}),
            "removed_at_s": round(events["removed_at"], 1), "added_at_s": round(events["added_at"], 1),
            "degraded_before_removal": sum(1 for at, k in outcomes if k == "degraded" and at < events["removed_at"]),
            "large_back_after_s": round(min(back) - events["added_at"], 1) if back else None,
            "removed_node_processes": len(large_pids),
            "removed_node_processes_left": [pid for pid in large_pids if psutil.pid_exists(pid)],
            # answers per 2 s window: how the service looked through the loss and the return
            "timeline": [{"from_s": w, **{k: sum(1 for at, kind in outcomes if w <= at < w + 2 and kind == k)
                                          for k in ("large", "degraded", "5xx", "connection")}}
                         for w in range(0, int(seconds), 2)],
        })
        result["ok"] = bool(result["5xx"] == 0 and large_pids and result["connection_errors"] == 0
                            and result["large_back_after_s"] is not None and not result["removed_node_processes_left"])
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="load duration of the serving case")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="max_steps of the training case")
    parser.add_argument("--cases", default="training,serving,data", help="comma-separated: training, serving, data")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args()
    cases = {"training": lambda: training_case(args.steps), "data": data_case,
             "serving": lambda: serving_case(args.seconds, args.concurrency)}
    unknown = sorted(set(args.cases.split(",")) - set(cases))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {sorted(cases)}")
    results = [cases[name]() for name in args.cases.split(",")]
    for result in results:
        print(json.dumps(result), flush=True)
    summary = {"summary": True, "cases": [r["case"] for r in results], "ok": all(r["ok"] for r in results),
               "not_built": []}
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
