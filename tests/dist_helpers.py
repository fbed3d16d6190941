"""Running a test function on several real gloo processes on this machine."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed reads it; Ray Train sets it in the real workers
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int, fn: Callable, *args, preload: Sequence[str] = ()) -> None:
    """Runs `fn(rank, world_size, *args)` on `world_size` gloo processes; raises if any fails.

    forkserver, not spawn: a spawned child re-imports torch and the test module
    (seconds per process on 2 cores); children forked from a server that
    preloaded them start at once. Not plain fork: the pytest process may hold
    threads (Ray, OpenMP) from other tests. `preload` names the modules to
    import in the server (the test module, so `fn` unpickles at once).
    """
    mp.set_forkserver_preload(["torch", "torch.distributed", *preload])
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="forkserver")
