"""Stops a local Ray whose driver died without shutting it down (SIGKILL, OOM killer).

    python -m cluster.reaper   (started by `cluster.launch`, never by hand)

Ray's GCS and raylet notice a dead driver, but its dashboard and runtime-env
agents outlive it by minutes, holding ports and memory. The driver starts this
process right after `ray.init` in a session of its own, with a pipe on its
stdin. While the pipe is open the reaper records the driver's descendants
(pid and start time, so a reused pid is never hit); when the pipe closes (the
driver exited, however it died) it terminates the recorded processes that are
still alive, then kills what is left after a grace period.
"""

from __future__ import annotations

import os
import select
import sys

import psutil

GRACE_S = 3.0
REFRESH_S = 1.0


def _descendants(pid: int, known: dict[int, float]) -> None:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        if child.pid == os.getpid():
            continue
        try:
            known.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    alive = []
    for pid, created in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            pass
    return alive


def main() -> None:
    driver = int(sys.argv[1])
    known: dict[int, float] = {}
    while True:
        _descendants(driver, known)
        ready, _, _ = select.select([sys.stdin], [], [], REFRESH_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone
    # Processes started by the recorded ones after the last refresh (workers of the raylet).
    for process in _alive(known):
        _descendants(process.pid, known)
    leftovers = _alive(known)
    for process in leftovers:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(leftovers, timeout=GRACE_S)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    main()
