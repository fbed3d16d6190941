"""The driver of `python -m moe.train`: validate, prepare data, start Ray, fit, summarise.

Everything that can be checked is checked before Ray starts. Ray Train's
`TorchTrainer` does the placement, the process groups, restarts and the
checkpoint registry; this module only configures it and watches the run
directory for the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from moe.config import ModelConfig
from moe.model import peak_bf16_tflops

from cluster.checkpointing import latest_checkpoint, read_train_state, resolve_resume, set_aside_newer, step_dirs
from cluster.config import check_memory_plan, model_config_from, to_plain, validate_train_config
from cluster.initial_weights import check_init_from, config_differences
from cluster.schema import WorkerConfig
from cluster.teacher import check_resume_teacher, check_teacher
from cluster.metrics import read_metrics
from cluster.runtime import check_port_free, dashboard_url, init_local_ray, start_reaper
from cluster.reshard import Layout
from cluster.worker import STATUS_FILE

RAY_TRAIN_DIR = "ray_train"


def run_dir_of(cfg: DictConfig) -> Path:
    return (Path(cfg.trainer.run_root) / cfg.name).resolve()


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A fresh run never overwrites the checkpoints of an earlier run of the same name."""
    if cfg.trainer.resume is None and step_dirs(run_dir / "checkpoints"):
        raise ValueError(f"invalid configuration: trainer.resume: {run_dir} already holds checkpoints of a "
                         f"run named {cfg.name!r}; set trainer.resume=auto to continue it, or choose another "
                         f"name (name=...) or trainer.run_root")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Runs a whole training job and returns its summary.

    NOTE: the order matters. 1) Everything that can be checked is checked
    (config values, the run directory, local resources, the prepared data, the
    checkpoint to resume from) before anything is changed on disk or Ray
    starts. 2) Checkpoints newer than the one resumed from are set aside.
    3) Ray starts and Ray Train runs the workers.

    Raises:
        ValueError: bad configuration, data or checkpoint (the message names the culprit).
        TrainingStopped: the run stopped on purpose (too many NaN steps).
    """
    run_dir, data_dir, model_config, teacher_sha256, resume_from, init_from = _check_before_ray(cfg)  # 1), 2)
    _start_ray(cfg)  # 3)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / STATUS_FILE).unlink(missing_ok=True)
    print(f"[moe.train] run directory: {run_dir}", flush=True)

    worker_config = WorkerConfig(
        name=cfg.name, trainer=OmegaConf.to_object(cfg.trainer), data=OmegaConf.to_object(cfg.data),
        model=model_config, logger=OmegaConf.to_object(cfg.logger), ep=cfg.parallel.ep, run_dir=str(run_dir),
        data_dir=str(data_dir), launch_id=uuid.uuid4().hex, resume_from=str(resume_from) if resume_from else None,
        init_from=str(init_from) if init_from else None,
        resolved=to_plain(cfg), teacher_sha256=teacher_sha256)
    progress = _Progress(run_dir, cfg.trainer.max_steps) if cfg.logger.progress_bar else None
    try:
        _fit_interruptibly(_ray_trainer(cfg, worker_config, run_dir))
    finally:
        if progress:
            progress.stop()
    status_file = run_dir / STATUS_FILE
    if not status_file.is_file():
        raise RuntimeError(f"training ended without writing {status_file}; see the Ray logs above")
    status = json.loads(status_file.read_text())
    summary = summarise(run_dir, status, plots=cfg.logger.plots)
    if status["status"] != "finished":
        raise TrainingStopped(status["message"])
    return summary


def _check_before_ray(cfg: DictConfig) -> tuple[Path, Path, ModelConfig, Optional[str], Optional[Path],
                                                  Optional[Path]]:
    """Steps 1) and 2) of `train`: every check (config, run directory, local resources, data prepared if it is
    not, memory plan, teacher, checkpoint to resume from; the local dashboard's port free before the data is
    prepared), then newer checkpoints set aside. Returns (run directory, data directory, model config, teacher
    sha256, checkpoint to resume from, checkpoint to initialise from)."""
    validate_train_config(cfg)
    run_dir = run_dir_of(cfg)
    check_run_dir(cfg, run_dir)
    if cfg.cluster.address is None:
        import ray

        ray_running = ray.is_initialized()
        check_local_resources(cfg, ray.cluster_resources() if ray_running else local_resources(cfg))
        # After the config's own checks (named first even beside another local Ray), before the data is
        # prepared (minutes on a large corpus): the local Ray's dashboard binds its port with no retry.
        if not ray_running:
            check_port_free("127.0.0.1", cfg.cluster.dashboard_port, "cluster.dashboard_port")

    from data_pipeline.prepare import ensure_prepared
    from data_pipeline.manifest import read_manifest

    data_dir = ensure_prepared(cfg.data).resolve()  # workers run in other directories
    cfg.data.output = str(data_dir)
    vocab_size = read_manifest(data_dir)["vocab_size"]
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab_size:
        raise ValueError(f"invalid configuration: model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                         f"tokenizer's vocabulary ({vocab_size}) of {data_dir}; leave it null to use the tokenizer's")
    model_config = model_config_from(cfg, vocab_size)
    check_memory_plan(cfg, model_config)
    check_data(cfg, data_dir)
    teacher, teacher_sha256 = None, None
    if cfg.trainer.distill.teacher is not None:
        teacher, teacher_sha256 = check_teacher(cfg.trainer.distill.teacher, data_dir, model_config)
        cfg.trainer.distill.teacher = str(teacher)  # workers run in other directories
    resume_from, init_from = choose_start(cfg, run_dir / "checkpoints", model_config, teacher, teacher_sha256)
    return run_dir, data_dir, model_config, teacher_sha256, resume_from, init_from


def _start_ray(cfg: DictConfig) -> None:
    """A local Ray with its dashboard (and the reaper of its processes), or the cluster at cluster.address; none
    when Ray already runs (tests and notebooks may have started it)."""
    import ray

    if not ray.is_initialized():
        if cfg.cluster.address is None:
            init_local_ray(include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=cfg.cluster.dashboard_port, num_cpus=cfg.cluster.num_cpus)
            start_reaper()
        else:
            ray.init(address=cfg.cluster.address)
    print(f"[moe.train] Ray dashboard: {dashboard_url() or '(none: this Ray runs without its dashboard)'}",
          flush=True)


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def worker_env_vars(cfg: DictConfig) -> dict[str, str]:
    """The training workers' environment variables. On GPUs, PyTorch's caching allocator with expandable segments
    (issue 18, S8): blocks of varying size, as dropless routing gives each step, then grow one segment instead of
    leaving unusable gaps, which the memory plan does not count. A PYTORCH_CUDA_ALLOC_CONF of the driver's
    environment reaches the workers unchanged instead (on every node)."""
    if not cfg.cluster.use_gpu:
        return {}
    return {ALLOC_CONF: os.environ.get(ALLOC_CONF, "expandable_segments:True")}


def _ray_trainer(cfg: DictConfig, worker_config: WorkerConfig, run_dir: Path) -> Any:
    """Ray Train's TorchTrainer of the run: one `_train_loop` per worker."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config={"worker": worker_config},  # Ray Train wants a dict
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                               resources_per_worker={"CPU": cfg.cluster.cpus_per_worker,
                                                                     **cfg.cluster.worker_resources}),
        # Ray Train's own run state lives in run_dir/ray_train and never lists
        # checkpoints (the workers report metrics only): which checkpoint to
        # resume from is decided above, from the disk.
        run_config=ray.train.RunConfig(
            name=RAY_TRAIN_DIR, storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            worker_runtime_env={"env_vars": worker_env_vars(cfg)}),
    )


def _fit_interruptibly(trainer: Any) -> None:
    """Runs `trainer.fit()` so that Ctrl-C reaches us as KeyboardInterrupt.

    From the main thread, Ray Train installs its own SIGINT handler, which
    aborts the run and then exits the process with status 1 and no word of
    where the run stood. From another thread it installs none: the main
    thread waits, and on Ctrl-C disconnects from Ray (the train controller,
    owned by this driver, dies with it and takes the workers along; checkpoint
    writes are atomic) and re-raises, so `moe.train` can report the step
    reached and how to resume.
    """
    import ray

    outcome: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        print("\n[moe.train] Ctrl-C: stopping the workers", file=sys.stderr, flush=True)
        ray.shutdown()
        raise
    if outcome:
        raise outcome[0]


def choose_start(cfg: DictConfig, checkpoint_root: Path, model_config: ModelConfig,
                 teacher: Optional[Path] = None, teacher_sha256: Optional[str] = None
                 ) -> tuple[Optional[Path], Optional[Path]]:
    """Where the workers start: (checkpoint to resume, weights of trainer.init_from), at most one of them.

    Decided on the driver before Ray starts (see cluster/checkpointing.py): the
    checkpoint is verified (every file its ranks wrote); newer ones are set
    aside. Another trainer.engine, parallel.ep or number of workers is fine:
    the workers reshard the optimizer state (cluster/reshard.py). `init_from`
    applies only to a run that does not resume, and is checked against the
    model (cluster/initial_weights.py). A worker group that Ray Train restarts
    within this launch continues from the launch's own newest checkpoint
    instead (`cluster.worker.start_checkpoint`).
    """
    resume_from = resolve_resume(checkpoint_root, cfg.trainer.resume)
    init_from = None
    if cfg.trainer.init_from and resume_from is None:
        init_from = check_init_from(cfg.trainer.init_from, model_config)
    if resume_from is not None:
        check_resume_teacher(read_train_state(resume_from), resume_from, teacher, teacher_sha256)
    set_aside_newer(checkpoint_root, resume_from)
    if resume_from is not None:
        here = Layout(cfg.trainer.engine, cfg.parallel.ep, cfg.cluster.num_workers)
        writer = Layout.of_checkpoint(read_train_state(resume_from), here)
        print(f"[moe.train] resuming from {resume_from}"
              + (f"; its optimizer state (trainer.engine={writer.engine}, parallel.ep={writer.ep}, "
                 f"{writer.world_size} workers) is resharded for this run's layout"
                 if not writer.same_state_as(here) else "")
              + ("; trainer.init_from is not used: the run continues its own checkpoint"
                 if cfg.trainer.init_from else ""), flush=True)
    if init_from is not None:
        differences = config_differences(init_from, model_config)
        print(f"[moe.train] starting from the weights in {init_from}"
              + (f"; model settings changed (theirs -> this run's): {', '.join(differences)}" if differences else ""),
              flush=True)
    return resume_from, init_from


def check_data(cfg: DictConfig, data_dir: Path) -> None:
    """The prepared directory can feed this run: shards intact, tokenizer matching, a big enough validation split."""
    from data_pipeline.prepare import check_prepared

    check_prepared(data_dir, seq_len=cfg.data.seq_len, global_batch_size=cfg.trainer.global_batch_size,
                   need_validation=True, on_corrupt=cfg.data.on_corrupt)


def interrupted_message(cfg: DictConfig, overrides: list[str]) -> str:
    """What a user needs after Ctrl-C: the step reached, the latest checkpoint, the command that resumes."""
    run_dir = run_dir_of(cfg)
    train_steps = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"] \
        if (run_dir / "metrics.jsonl").is_file() else []
    latest = latest_checkpoint(run_dir / "checkpoints")
    kept = [o for o in overrides if not o.lstrip("+~").startswith("trainer.resume=")]
    command = " ".join(["python -m moe.train", *kept, "trainer.resume=auto"])
    where = f"step {train_steps[-1]} of {cfg.trainer.max_steps}" if train_steps else "before the first step"
    saved = f"latest checkpoint: {latest}" if latest else "no checkpoint was written"
    return f"interrupted at {where}; {saved}; resume with: {command}"


def local_resources(cfg: DictConfig) -> dict[str, float]:
    """What a local Ray started with this config will hold."""
    import torch

    return {"CPU": float(cfg.cluster.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_local_resources(cfg: DictConfig, resources: dict[str, float]) -> None:
    """On a local Ray (no autoscaler) a request it cannot hold would wait forever: fail instead."""
    c = cfg.cluster
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if c.num_workers * c.cpus_per_worker > cpus:
        raise ValueError(f"invalid configuration: cluster.cpus_per_worker: {c.num_workers} workers x "
                         f"{c.cpus_per_worker} CPUs exceed the {cpus:g} CPUs of the local Ray; lower "
                         f"cluster.cpus_per_worker or cluster.num_workers")
    for name in c.worker_resources:  # a local Ray offers none: the workers would never be placed
        if name not in resources:
            raise ValueError(f"invalid configuration: cluster.worker_resources.{name}: the local Ray offers no "
                             f"{name!r} resource; custom resources are for a cluster whose nodes declare them "
                             f"(cluster.address)")
    if c.use_gpu and c.num_workers > gpus:
        raise ValueError(f"invalid configuration: cluster.use_gpu: {c.num_workers} workers need one GPU each and "
                         f"the local Ray has {gpus:g}")


def _train_loop(config: dict[str, Any]) -> None:
    from cluster.worker import train_loop_per_worker

    train_loop_per_worker(config["worker"])


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many NaN steps); its last good checkpoint is kept."""


def summarise(run_dir: Path, status: dict[str, Any], plots: bool = True) -> dict[str, Any]:
    """Final figures, summary.json and (`plots`, logger.plots) the plots."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    diagnostics = [r for r in records if r["kind"] == "diagnostics"]
    summary: dict[str, Any] = {"status": status["status"], "final_step": status["final_step"],
                               "bad_steps": status["bad_steps"]}
    if train:
        last = train[-min(10, len(train)):]
        summary["final_train_loss"] = sum(r["loss"] for r in last if math.isfinite(r["loss"])) / max(
            1, sum(math.isfinite(r["loss"]) for r in last))
        steady = train[min(len(train) - 1, 3):]  # the first steps include start-up
        step_tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steady)
        summary["tokens_per_s"] = step_tokens / sum(r["step_time_s"] for r in steady)
    if evals:
        summary["val_loss"] = evals[-1]["val_loss"]
        summary["val_loss_stderr"] = evals[-1].get("val_loss_stderr")
        summary["val_ppl"] = evals[-1]["val_ppl"]
    summary["mfu"] = _mfu(summary.get("tokens_per_s"), status)
    if plots:
        summary.update(_plots(run_dir, train, evals, diagnostics))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[moe.train] summary: " + json.dumps(summary), flush=True)
    return summary


def _plots(run_dir: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]],
           diagnostics: list[dict[str, Any]]) -> dict[str, str]:
    """The run's PNG plots; returns their paths by summary key."""
    from cluster.plots import plot_diagnostics, plot_expert_load, plot_loss, plot_routing_over_time

    paths = {"loss_curve": plot_loss(run_dir, train, evals)}
    if train and train[-1]["tokens_per_expert"]:
        paths["expert_load_heatmap"] = plot_expert_load(run_dir, train)
        paths["routing_plot"] = plot_routing_over_time(run_dir, train)
    if train and train[-1].get("grad_norm_by_group"):
        paths["diagnostics_plot"] = plot_diagnostics(run_dir, train, diagnostics)
    return {key: str(path) for key, path in paths.items()}


def _mfu(tokens_per_s: Optional[float], status: dict[str, Any]) -> Optional[float]:
    """Model FLOPs utilisation on the workers' GPUs, named by the workers in status.json (the driver may run on a
    GPU-less head; issue 18, K2); None on the CPU or an unknown device."""
    name = status.get("device_name")
    if not tokens_per_s or not name:
        return None
    peak = peak_bf16_tflops(name)
    if peak is None:
        return None
    return tokens_per_s * status["flops_per_token"] / (peak * 1e12 * status["world_size"])


class _Progress:
    """A progress bar on the driver, fed by the run's metrics.jsonl (step, loss, tokens/s, ETA)."""

    def __init__(self, run_dir: Path, max_steps: int) -> None:
        self._path = run_dir / "metrics.jsonl"
        self._max_steps = max_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self._max_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        offset = 0
        while not self._stop.is_set():
            time.sleep(0.5)
            if not self._path.exists():
                continue
            with self._path.open() as f:
                f.seek(offset)
                lines = f.readlines()
                offset = f.tell()
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("kind") == "train":
                    bar.n = record["step"]
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    bar.refresh()
        bar.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
