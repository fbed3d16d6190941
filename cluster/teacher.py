"""The distillation teacher (`trainer.distill`): checked on the driver, loaded frozen in each worker.

The driver checks, before Ray starts, that the teacher is a moe checkpoint
trained with the same tokenizer as the prepared data (naming both files), and
records the sha256 of its weights: it goes into every checkpoint's
train_state.json, and a run resumes only with the teacher it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from moe.checkpoint import load_checkpoint, read_model_config, weight_files, weights_sha256
from moe.files import TOKENIZER_NAME, file_sha256
from moe.config import ModelConfig
from moe.model import MoETransformer, training_flops_per_token



def check_teacher(teacher: str, data_dir: Path, student: ModelConfig) -> tuple[Path, str]:
    """Validates trainer.distill.teacher on the driver; returns (its absolute path, the sha256 of its weights).

    Raises:
        ValueError: naming `trainer.distill.teacher` and the file at fault: not a
            checkpoint, no tokenizer.json, a tokenizer other than the data's, or
            a vocabulary other than the student's.
    """
    path = Path(teacher).expanduser().resolve()
    key = "invalid configuration: trainer.distill.teacher"
    try:
        config = read_model_config(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{key}: {err} (a checkpoint written by moe.train, e.g. runs/NAME/checkpoints/step_N)") \
            from None
    tokenizer = path / TOKENIZER_NAME
    try:
        weight_files(path)
    except FileNotFoundError as err:
        raise ValueError(f"{key}: {err}") from None
    if not tokenizer.is_file():
        raise ValueError(f"{key}: {tokenizer} is missing (checkpoints of moe.train carry their data's tokenizer)")
    data_tokenizer = data_dir / TOKENIZER_NAME
    if file_sha256(tokenizer) != file_sha256(data_tokenizer):
        raise ValueError(f"{key}: the teacher's tokenizer {tokenizer} differs from the prepared data's "
                         f"{data_tokenizer}: a teacher must be trained with the student's tokenizer")
    if config.vocab_size != student.vocab_size:
        raise ValueError(f"{key}: the teacher's vocabulary ({config.vocab_size} in {path / 'config.json'}) "
                         f"differs from the student's ({student.vocab_size})")
    return path, weights_sha256(path)


def check_resume_teacher(train_state: dict[str, Any], checkpoint: Path, teacher: Optional[Path],
                         teacher_sha256: Optional[str]) -> None:
    """A run resumes only with the teacher its checkpoint was trained with (or none if it had none).

    Raises:
        ValueError: naming trainer.distill.teacher, the checkpoint's teacher and this run's.
    """
    recorded = train_state.get("distill") or {}
    if recorded.get("teacher_sha256") == teacher_sha256:
        return
    theirs = (f"{recorded.get('teacher')} (sha256 {str(recorded.get('teacher_sha256'))[:12]}...)"
              if recorded else "no teacher")
    ours = f"{teacher} (sha256 {str(teacher_sha256)[:12]}...)" if teacher is not None else "no teacher"
    raise ValueError(f"invalid configuration: trainer.distill.teacher: {checkpoint} was trained with {theirs}, "
                     f"this run has {ours}; resume with the same teacher, or start a new run (trainer.init_from "
                     f"takes the weights)")


def load_teacher(path: str, device: torch.device) -> MoETransformer:
    """The frozen teacher in eval mode on `device` (bfloat16 weights on a GPU, as the student's autocast)."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    teacher = load_checkpoint(path, device=device, dtype=dtype).eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the teacher: a third of its training FLOPs (no backward)."""
    return training_flops_per_token(config, seq_len) / 3.0
