"""End-of-run figures: the loss curve, the expert-load heatmap (layers x experts), routing over time and
the MoE diagnostics (cluster/diagnostics.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss(run_dir: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train if math.isfinite(r["loss"])]
    ax.plot(steps, [r["loss"] for r in train if math.isfinite(r["loss"])], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    path = run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(run_dir: Path, train: list[dict[str, Any]], last_steps: int = 50) -> Path:
    """Share of the routed tokens each expert received over the last steps, per MoE layer."""
    recent = [np.asarray(r["tokens_per_expert"], dtype=np.float64) for r in train[-last_steps:]]
    load_LE = np.sum(recent, axis=0)
    share_LE = load_LE / np.clip(load_LE.sum(axis=1, keepdims=True), 1e-9, None)
    num_layers, num_experts = share_LE.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * num_experts, 1.2 + 0.5 * num_layers))
    image = ax.imshow(share_LE, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers))
    ax.set_title(f"token share per expert (last {len(recent)} steps; uniform = {1 / num_experts:.3f})")
    for layer in range(num_layers):
        for expert in range(num_experts):
            ax.text(expert, layer, f"{share_LE[layer, expert]:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax)
    path = run_dir / "expert_load.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing_over_time(run_dir: Path, train: list[dict[str, Any]]) -> Path:
    """Per MoE layer over the steps: the router's mean entropy and the max/mean expert load."""
    steps = [r["step"] for r in train]
    load_SL = np.asarray([r["max_over_mean_load"] for r in train], dtype=np.float64)
    entropy_SL = np.asarray([r.get("router_entropy") or [np.nan] * load_SL.shape[1] for r in train],
                            dtype=np.float64)
    num_experts = len(train[-1]["tokens_per_expert"][0])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for layer in range(load_SL.shape[1]):
        top.plot(steps, entropy_SL[:, layer], label=f"layer {layer}", linewidth=1)
        bottom.plot(steps, load_SL[:, layer], label=f"layer {layer}", linewidth=1)
    top.axhline(np.log(num_experts), color="grey", linestyle="--", linewidth=0.8)
    top.set_ylabel("router entropy (nats)")
    top.set_title(f"routing over training (dashed: uniform over {num_experts} experts)")
    bottom.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    bottom.set_ylabel("max / mean tokens per expert")
    bottom.set_xlabel("step")
    top.legend(fontsize=7, ncol=2)
    path = run_dir / "routing.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_diagnostics(run_dir: Path, train: list[dict[str, Any]], diagnostics: list[dict[str, Any]]) -> Path:
    """Gradient norm per parameter group; for MoE runs also the least-loaded expert per layer, the spread of
    expert weight norms per layer and the routing fluctuation of the probe tokens."""
    steps = [r["step"] for r in train]
    groups = [g for g in train[-1]["grad_norm_by_group"] if any(r["grad_norm_by_group"].get(g) for r in train)]
    has_moe = bool(train[-1].get("tokens_per_expert"))
    fig, axes = plt.subplots(4 if has_moe else 1, 1, figsize=(8, 11 if has_moe else 3.5), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for group in groups:
        ax.plot(steps, [r["grad_norm_by_group"].get(group, np.nan) for r in train], label=group, linewidth=1)
    ax.set_yscale("log")
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title(f"{run_dir.name}: diagnostics")
    ax.legend(fontsize=7, ncol=3)
    if has_moe:
        starved_SL = np.asarray([r["min_over_mean_load"] for r in train], dtype=np.float64)
        ax = axes[1, 0]
        for layer in range(starved_SL.shape[1]):
            ax.plot(steps, starved_SL[:, layer], label=f"layer {layer}", linewidth=1)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("min / mean tokens per expert")
        ax.legend(fontsize=7, ncol=2)
        diag_steps = [r["step"] for r in diagnostics]
        ax = axes[2, 0]
        if diagnostics:
            norms_SLE = np.asarray([r["expert_weight_norm"] for r in diagnostics], dtype=np.float64)
            for layer in range(norms_SLE.shape[1]):
                line, = ax.plot(diag_steps, norms_SLE[:, layer].mean(-1), label=f"layer {layer}", linewidth=1)
                ax.fill_between(diag_steps, norms_SLE[:, layer].min(-1), norms_SLE[:, layer].max(-1),
                                color=line.get_color(), alpha=0.2)
            ax.legend(fontsize=7, ncol=2)
        ax.set_ylabel("expert weight norm\n(mean, min-max band)")
        ax = axes[3, 0]
        changes = [(r["step"], r["topk_change_fraction"]) for r in diagnostics if r["topk_change_fraction"]]
        if changes:
            change_SL = np.asarray([c for _, c in changes], dtype=np.float64)
            for layer in range(change_SL.shape[1]):
                ax.plot([s for s, _ in changes], change_SL[:, layer], "o-", label=f"layer {layer}", linewidth=1,
                        markersize=3)
            ax.legend(fontsize=7, ncol=2)
        ax.set_ylabel("probe tokens whose top-k\nchanged since last point")
    axes[-1, 0].set_xlabel("step")
    path = run_dir / "diagnostics.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
