"""Atomic directory writes: the one swap for every directory this project writes.

Checkpoints, Hugging Face exports and prepared data are each written to a
temporary sibling directory and renamed into place, so an interrupted write
never leaves a directory that looks complete and never destroys the one it
replaces until the new one is whole. Each caller says which existing directory
it may replace (one it wrote itself, recognised by its files); anything else,
and any file, is refused before the write starts, so a mistyped path never
deletes a user's data. Standard library only (command lines check their output
paths with it before torch loads).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


class ReplaceRefusedError(ValueError):
    """An existing path that a directory write may not replace; the message names it and why."""

    def __init__(self, target: PathLike, reason: str, label: str = "") -> None:
        super().__init__(f"refusing to replace {label + '=' if label else ''}{target}: {reason}")
        self.target = Path(target)
        self.reason = reason
        self.label = label

    def __reduce__(self):
        # Rebuilt from its fields, so that it crosses a process boundary (Ray) intact.
        return type(self), (self.target, self.reason, self.label)


def check_replaceable(target: Path, *, replaceable: Callable[[Path], bool], kind: str, label: str = "") -> None:
    """Raises `ReplaceRefusedError` unless `target` is absent, an empty directory, or `replaceable(target)`.

    Args:
        target: the path a write would replace.
        replaceable: whether an existing non-empty directory is one this kind of
            write made (and may therefore replace).
        kind: what `replaceable` recognises, for the message ("a moe checkpoint").
        label: the config key that named `target`, for the message.
    """
    if target.is_symlink():
        raise ReplaceRefusedError(target, f"it is a symbolic link (to {os.readlink(target)}); name the directory "
                                  "it points to", label)
    if not target.exists():
        return
    if not target.is_dir():
        raise ReplaceRefusedError(target, f"it is an existing file, not {kind}; a file is never replaced", label)
    if next(target.iterdir(), None) is None or replaceable(target):
        return
    raise ReplaceRefusedError(target, f"it is a non-empty directory that is not {kind}; only {kind} or an "
                              "empty directory is replaced (remove it or choose another path)", label)


def replace_directory(tmp: Path, target: Path, *, replaceable: Callable[[Path], bool], kind: str,
                      label: str = "") -> None:
    """Moves the complete directory `tmp` to `target`, replacing what is there if that may be replaced.

    The old `target` is renamed aside first and removed only after the swap, so
    at every moment either the old or the new directory is in place.

    Args:
        tmp: the finished directory, a sibling of `target`.
        target: where it goes.
        replaceable, kind, label: see `check_replaceable`; checked before anything moves.
    Raises:
        ReplaceRefusedError: `target` is a file, a symbolic link or a
            non-empty directory that `replaceable` does not recognise.
    """
    check_replaceable(target, replaceable=replaceable, kind=kind, label=label)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_directory_atomically(directory: Path, write: Callable[[Path], None], *,
                               replaceable: Callable[[Path], bool], kind: str) -> Path:
    """Calls `write(tmp)` on a fresh sibling directory, then swaps it into `directory`.

    `directory` is checked (see `check_replaceable`) before `write` runs, so a
    refused target costs no work. An exception (or a crash) leaves `directory`
    as it was.

    Returns:
        The directory written (the target of a symbolic link, if `directory` is one).
    """
    if directory.is_symlink():
        # Write where the link points: replacing the link would move the data
        # off the volume the user linked to.
        directory = directory.resolve()
    check_replaceable(directory, replaceable=replaceable, kind=kind)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        replace_directory(tmp, directory, replaceable=replaceable, kind=kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
