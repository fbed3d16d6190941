"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

import pytest
import torch

from dist_helpers import free_port

# Ray Train's own watchers, tuned for a 2-core test machine. They are set here, before any Ray starts, so
# that the session's Ray and every `python -m moe.train` a test starts inherit them. Neither changes what a
# test checks: the controller polls its workers every 0.2 s instead of 2 s (a finished or killed worker is
# noticed sooner), and the spot-preemption watcher (one more actor process per run) has no preemptions to
# watch for on one machine.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Logical CPUs of the session's Ray: two training workers, or the serving tests' three applications.
SESSION_RAY_CPUS = 4

# Under pytest-xdist (`make test` runs two workers), the name of this process's worker; None without xdist.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER is not None:
    # Two workers share the two cores: a second torch thread in each would only spin against the other worker.
    torch.set_num_threads(1)


def _needs_session_ray(item) -> bool:
    return "ray_cluster" in getattr(item, "fixturenames", ())


def _starts_own_ray(item) -> bool:
    """Marked `own_ray`: starts a local Ray of its own (`python -m moe.train` through to training, a simulated
    cluster); a CLI test refused before Ray starts is not marked."""
    return item.get_closest_marker("own_ray") is not None


def pytest_itemcollected(item) -> None:
    """Under xdist, the tests that need a Ray (the session's, or one of their own) form one group ("ray") that
    one worker runs, in order (see below), while the other worker takes every other test (then both share what
    is left). Marked as they are collected, before xdist's own pytest_collection_modifyitems names the groups.

    Two local Rays at once are correct (cluster.runtime's NOTE) but slow: measured, with the training CLI's
    Ctrl-C test on the other worker beside the session's Ray, it took 77 s instead of 36 s, the Ray tests of
    test_train ran 30-100% longer, and the suite's CPU time grew by 90 s (their background processes, alive
    longer, on both Rays): one Ray at a time is what fits two cores.
    """
    if XDIST_WORKER is not None and (_needs_session_ray(item) or _starts_own_ray(item)):
        item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_collection_modifyitems(session, config, items) -> None:
    """The tests that use the session's Ray run last, in their usual order.

    The session's Ray lives from its first user to the end of the session, so
    the tests that start a Ray of their own run before it and meet no other
    local Ray (the drills that simulate a cluster through Ray's cluster_utils
    need that: their processes are not given their address as
    `cluster.runtime.init_local_ray` gives it). A module with tests of both
    kinds builds its module fixtures twice.
    """
    items.sort(key=_needs_session_ray)  # stable: the order is kept otherwise


@pytest.fixture(autouse=True)
def _xdist_group_stays_on_one_worker(request, tmp_path_factory):
    """Under xdist, fails a test of an xdist group that runs on a second worker: were the groups ever dropped
    (pytest 9.2 drops them silently: pytest-xdist#1386), the session's Ray and the modules' Serve applications
    and trained runs would be built on every worker."""
    marker = request.node.get_closest_marker("xdist_group")
    if XDIST_WORKER is None or marker is None:
        return
    group = marker.args[0] if marker.args else marker.kwargs.get("name", "default")
    shared = tmp_path_factory.getbasetemp().parent  # one directory for all the workers of this run
    claim = shared / f"xdist_group_{group}"
    if not claim.exists():
        mine = shared / f"xdist_group_{group}.{XDIST_WORKER}"
        mine.write_text(XDIST_WORKER)
        try:
            os.link(mine, claim)  # atomic: the first worker to get here owns the group
        except FileExistsError:
            pass
    owner = claim.read_text()
    if owner != XDIST_WORKER:
        pytest.fail(f"{request.node.nodeid} is in xdist group {group!r} and runs on worker {XDIST_WORKER}, but "
                    f"the group runs on {owner}: xdist's --dist loadgroup did not keep it together (pytest<9.2?)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that only needs a running Ray (training through `cluster.launch.train`,
    Ray Data, Serve applications). Tests that kill Ray processes or start Ray themselves (the CLI tests) do not
    need it. A module that starts Serve shuts
    Serve down again, so the next module finds the CPUs free."""
    ray = pytest.importorskip("ray")
    from cluster.runtime import init_local_ray

    init_local_ray(num_cpus=SESSION_RAY_CPUS, include_dashboard=False, log_to_driver=False,
                   _metrics_export_port=free_port())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second torch thread only adds spinning when other tests share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_tier(data, steps: int, hidden_size: int, seed: int):
    """A few AdamW steps on the prepared training split (the large tier gets more, and is wider)."""
    from data_pipeline.loader import CurriculumLoader
    from moe import ModelConfig, MoETransformer

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, hidden_size=hidden_size, num_layers=2, num_heads=4, num_kv_heads=2,
                         max_seq_len=64, experts=dict(num_experts=4, hidden_size=32))
    model = MoETransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = CurriculumLoader(data, seq_len=32, global_batch_size=8, prefetch=0)
    for _, batch in zip(range(steps), loader):
        out = model(batch["input_ids"], doc_ids=batch["doc_ids"], targets=batch["targets"])
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def cascade_pair(tmp_path_factory):
    """A tiny prepared corpus and two tiers trained on it: runs/small (untrained, with a config.yaml naming
    the data, as moe.train writes) and runs/large (150 steps, wider). Tests must not modify them."""
    import shutil

    from data_pipeline.prepare import prepare
    from data_pipeline.testing import make_corpus, tiny_data_config
    from moe import save_checkpoint

    root = tmp_path_factory.mktemp("cascade_pair")
    make_corpus(root / "corpus", num_text=60)
    data = prepare(tiny_data_config(root / "corpus", root / "prepared", validation_fraction=0.3,
                                    calibration_fraction=0.3))
    checkpoints = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, steps, hidden_size, seed in (("small", 0, 32, 0), ("large", 150, 64, 1)):
            directory = save_checkpoint(_train_tier(data, steps, hidden_size, seed),
                                        root / "runs" / name / "checkpoints" / "step_00000010")
            shutil.copyfile(data / "tokenizer.json", directory / "tokenizer.json")
            checkpoints[name] = directory
    finally:
        torch.set_num_threads(threads)
    (root / "runs" / "small" / "config.yaml").write_text(f"data:\n  output: {data}\n  seq_len: 32\n")
    return {"root": root, "data": data, **checkpoints}
