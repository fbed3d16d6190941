"""Ray runtime helpers shared by the training driver (`cluster.launch`) and the Serve application
(`serving.app`): a local Ray that knows its own address, the reaper of a local Ray, and the connected Ray's
dashboard address."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

# NOTE: the address of a local Ray. Ray Train's placement-group cleaner (an actor of every run) asks Ray's
# state API whether the run's controller is alive without naming a cluster; the state API then takes
# RAY_ADDRESS, else looks for running GCS processes, and with a second local Ray on the machine (another
# training run, a notebook's ray.init, a test session) it finds two and the cleaner's thread dies with "Found
# multiple active Ray instances": a traceback on the run's terminal, and a placement group that nobody removes
# should the controller die. `init_local_ray` picks the GCS port itself and sets RAY_ADDRESS to it while Ray
# starts its processes, so that they, and every worker they start, inherit their own cluster's address (and
# RAY_GCS_SERVER_PORT, which only the start of a head node reads).


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def init_local_ray(**kwargs: Any) -> Any:
    """`ray.init` of a new local Ray whose processes know its address (see the NOTE above); returns ray.init's
    context. The driver's own environment is left as it was: a process it starts later (a CLI, another Ray)
    does not join this Ray unless told to."""
    import ray

    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    saved = {name: os.environ.get(name) for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=address, RAY_GCS_SERVER_PORT=str(port))
    try:
        context = ray.init(address="local", **kwargs)  # "local": a new Ray, whatever RAY_ADDRESS says
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if context.address_info["gcs_address"] != address:
        ray.shutdown()
        raise RuntimeError(f"the local Ray's GCS listens on {context.address_info['gcs_address']}, not on the "
                           f"{address} its processes were given")
    return context


def check_port_free(host: str, port: int, key: str) -> None:
    """Refuses, naming the config key, a port that a local Ray (its dashboard) or Serve would fail to bind after
    every other check: taken, e.g. by another run on this machine."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(f"invalid configuration: {key}: {host}:{port} is in use ({err.strerror}; another "
                             f"local run's?); give this one another port") from None


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
