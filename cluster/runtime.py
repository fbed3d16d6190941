"""Ray runtime helpers shared by the training driver (`cluster.launch`) and the Serve application
(`serving.app`): the reaper of a local Ray, and the connected Ray's dashboard address."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def start_reaper() -> None:
    """Starts `cluster.reaper`, which stops this local Ray if the driver dies without shutting it down."""
    import subprocess

    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-m", "cluster.reaper", str(os.getpid())], stdin=read_end,
                     start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
    os.close(read_end)
    os.set_inheritable(write_end, False)
    _REAPER_PIPE.append(write_end)  # open until this process exits


_REAPER_PIPE: list[int] = []


class _DropReinitNotice:
    """A logging filter for ray.init's "called again" notice, which `dashboard_url` triggers on purpose."""

    def filter(self, record) -> bool:
        return "ray.init() again" not in record.getMessage()


def dashboard_url() -> str:
    """The connected Ray's dashboard address (public API: `ray.init` on a connected driver returns its
    `RayContext` when asked to ignore the re-initialisation)."""
    import logging

    import ray

    notice = _DropReinitNotice()
    ray_logger = logging.getLogger("ray._private.worker")  # by name only: where ray.init logs its notice
    ray_logger.addFilter(notice)
    try:
        url = ray.init(ignore_reinit_error=True).dashboard_url or ""
    finally:
        ray_logger.removeFilter(notice)
    return url if not url or "://" in url else f"http://{url}"
