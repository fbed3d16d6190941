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


# aten ops that wait for the device on CUDA: a value read to the host, or an output whose size depends on the
# values (so the host must learn it). On the CPU they run without waiting, but a dispatch mode sees them all.
HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.bincount", "aten.nonzero", "aten._unique2", "aten.unique_dim",
                 "aten.unique_consecutive", "aten.masked_select", "aten.argwhere")


class HostSyncCounter:
    """Counts the device-to-host syncs of the code run inside it: the aten ops of HOST_SYNC_OPS (plus
    repeat_interleave with tensor repeats and no output_size), and calls of `moe.dispatch.host_ints`, the
    expert-parallel layer's named split-size read (a `.tolist()`, which no dispatch mode sees)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func.overloadpacket)
                if name in HOST_SYNC_OPS or (name == "aten.repeat_interleave" and len(args) > 1
                                             and isinstance(args[1], torch.Tensor)
                                             and kwargs.get("output_size") is None):
                    counter.ops.append(name)
                return func(*args, **kwargs)

        self.ops: list[str] = []
        self.host_ints = 0
        self._mode = _Mode()

    def __enter__(self) -> "HostSyncCounter":
        import moe.dispatch

        self._original = moe.dispatch.host_ints

        def counted(counts):
            self.host_ints += 1
            return self._original(counts)

        moe.dispatch.host_ints = counted
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        import moe.dispatch

        self._mode.__exit__(*exc)
        moe.dispatch.host_ints = self._original

    @property
    def total(self) -> int:
        return len(self.ops) + self.host_ints
