"""The typed configs of a training job, importable with torch alone (no Hydra).

`cluster.config` registers these schemas with Hydra's ConfigStore and
validates a composed config; the driver then hands each Ray Train worker one
`WorkerConfig` of these dataclasses (`cluster.launch`), so the workers and the
engines read typed, validated fields, never raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipeline.config import DataConfig
from moe.config import ModelConfig

ENGINES = ("native", "fsdp", "deepspeed")
DTYPES = ("float32", "bfloat16")


@dataclass
class DebugConfig:
    """Fault injection for tests and drills (never set in a real run)."""

    kill_rank_at_step: Optional[int] = None  # that rank's process exits once, at this step
    kill_rank: int = 0
    nan_loss_at_steps: list[int] = field(default_factory=list)  # these steps see a NaN loss


@dataclass
class DistillConfig:
    """`trainer.distill`: knowledge distillation from a frozen teacher (see moe/distill.py).

    Attributes:
        teacher: a moe checkpoint trained with the same tokenizer; None: no distillation.
        weight: the loss is (1 - weight) * next-token loss + weight * distillation loss.
        temperature: softens both distributions (the loss is scaled by its square).
        kind: `forward_kl` (KL(teacher || student)) or `reverse_kl`.
    """

    teacher: Optional[str] = None
    weight: float = 0.5
    temperature: float = 1.0
    kind: str = "forward_kl"


@dataclass
class TrainerConfig:
    """The `trainer` group.

    Attributes:
        max_steps: optimizer steps of the run.
        engine: "native" (our all-reduce of replicated gradients), "fsdp"
            (torch FSDP2: parameters, gradients and optimizer state sharded
            over the data-parallel ranks) or "deepspeed" (ZeRO); all three
            compose with expert parallelism (see cluster/engine.py).
        resume: None (fresh, refuses a run directory that has checkpoints),
            "auto" (latest complete checkpoint of this run, if any) or a path.
        init_from: start from these weights instead of the seeded
            initialisation (a moe checkpoint of any layout or a Hugging Face
            Mixtral directory), with a fresh optimizer and data order; not
            used when the run resumes (see cluster/initial_weights.py).
        global_batch_size: sequences per optimizer step over all workers.
        grad_accum_steps: micro-batches per optimizer step on each worker.
        dtype: "float32", or "bfloat16" autocast (CUDA).
        checkpoint_every / keep_last: checkpoint period and how many to keep.
        checkpoint_format: "full" (rank 0 gathers the model and writes model.safetensors while every rank
            waits) or "sharded" (each rank writes its own shards with torch.distributed.checkpoint, in a
            background thread; the training stalls only while they are copied: cluster/sharded_checkpoint.py).
            Either resumes the other's checkpoints, and both are read by moe.load_checkpoint.
        eval_every / eval_batches: validation period and size (0 = at the end only).
        diagnostics_every: period of the MoE diagnostics records (expert
            weight norms, routing fluctuation; see cluster/diagnostics.py); 0 = off.
        max_bad_steps: consecutive NaN/inf steps before the run stops.
        allow_tf32: with trainer.dtype=float32 on a GPU, let float32 matmuls run
            on TF32 tensor cores (10 mantissa bits instead of 23; several
            times faster); false keeps full float32. No effect on the CPU or
            under bfloat16.
        loss_chunk_tokens: compute the cross entropy over this many tokens at
            a time (`moe.model.chunked_cross_entropy`): the logits of a
            micro-batch and their gradients are never held whole (GiBs for a
            large vocabulary); 0 = off. Not with distillation, which needs the
            student's whole logits.
        zero_stage: ZeRO stage for engine=deepspeed (1 or 2).
        activation_checkpointing: "none", "full" (every block recomputes its
            activations in the backward pass) or "selective" (every other block);
            see `moe.MoETransformer.set_activation_checkpointing`.
        compile: compile each transformer block (`moe.MoETransformer.compile_blocks`).
        router_lr_scale: the routers' learning rate as a multiple of lr (their
            gradient norm matches all the experts' with 1/200 of their
            parameters in mixtral_tiny; see docs/results/moe_vs_dense.md).
        run_root: parent of the run directories.
        distill: knowledge distillation from a teacher checkpoint (off by default).
    """

    max_steps: int = 200
    engine: str = "native"
    resume: Optional[str] = None
    init_from: Optional[str] = None
    global_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    router_lr_scale: float = 1.0
    dtype: str = "float32"
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 3
    checkpoint_format: str = "full"
    eval_every: int = 0
    eval_batches: int = 8
    diagnostics_every: int = 50
    max_bad_steps: int = 5
    loss_chunk_tokens: int = 0
    allow_tf32: bool = True
    zero_stage: int = 1
    activation_checkpointing: str = "none"
    compile: bool = False
    run_root: str = "runs"
    distill: DistillConfig = field(default_factory=DistillConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass
class ParallelConfig:
    """The `parallel` group.

    Attributes:
        ep: the expert-parallel degree (1 = experts replicated).
        expert_load: what the memory plan sizes each rank's expert activations for: the expert rows of the rank
            with the hottest experts over the mean, >= 1 (`moe.plan`). null: the most dropless routing can send
            one rank (ep x min(top_k, experts per rank) / top_k; 4 for 8 experts, top-2, ep = 8).
    """

    ep: int = 1
    expert_load: Optional[float] = None


@dataclass
class ClusterConfig:
    """The `cluster` group.

    Attributes:
        address: None starts a local Ray with its dashboard on 127.0.0.1;
            "auto" (or ray://..., host:port) joins an existing cluster.
        num_workers: Ray Train workers (one process, one GPU each on GPU).
        use_gpu: one GPU per worker and NCCL; otherwise CPU and gloo.
        cpus_per_worker: CPUs reserved per worker.
        worker_resources: custom Ray resources each worker also reserves, e.g.
            {trainer_slot: 1} on a cluster whose nodes offer one `trainer_slot`
            each: one worker per such node (placement across nodes). CPU and
            GPU come from cpus_per_worker and use_gpu.
        max_failures: worker-group restarts Ray Train may make (FailureConfig).
        dashboard_port: port of the local dashboard.
        num_cpus: CPUs of a local Ray (None: all of the machine).
        gpu_memory_gib: memory of each worker's GPU for the memory plan
            (`python -m cluster.plan`); None: the driver's first GPU when it has
            one, else the plan is not checked.
    """

    address: Optional[str] = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    worker_resources: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0
    dashboard_port: int = 8265
    num_cpus: Optional[int] = None
    gpu_memory_gib: Optional[float] = None


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "moe-ray"
    entity: Optional[str] = None


@dataclass
class LoggerConfig:
    """The `logger` group: JSONL metrics are always written; wandb and Ray metrics are optional. `plots`: draw the
    run's PNG plots at its end (matplotlib, about 2 s on a CPU; false for sweeps of short runs)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    ray_metrics: bool = True
    progress_bar: bool = True
    plots: bool = True


@dataclass
class WorkerConfig:
    """What the driver gives each Ray Train worker: the validated groups it uses, and where things are.

    Attributes:
        name: the run's name.
        trainer, data, logger: the composed groups.
        model: the model (vocab_size filled in from the prepared tokenizer).
        ep: parallel.ep.
        run_dir: the run directory (metrics, checkpoints, status).
        data_dir: the prepared data (absolute: workers run in other directories).
        launch_id: unique per `moe.train` launch: a restarted worker group resumes from this launch's newest
            checkpoint (see `cluster.worker.start_checkpoint`).
        resume_from: the checkpoint the driver chose before Ray started, or None.
        init_from: the weights a run that does not resume starts from (validated by the driver), or None.
        teacher_sha256: the sha256 of trainer.distill.teacher's weights (computed by the driver), or None.
        resolved: the whole resolved config as plain data (logged to wandb).
    """

    name: str
    trainer: TrainerConfig
    data: DataConfig
    model: ModelConfig
    logger: LoggerConfig
    ep: int
    run_dir: str
    data_dir: str
    launch_id: str
    resume_from: Optional[str]
    init_from: Optional[str]
    resolved: dict[str, Any]
    teacher_sha256: Optional[str] = None
