"""data.engine=ray: Ray Data tokenization and scoring give the local engine's output, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

import data_pipeline.prepare as prepare_module
from data_pipeline.engine import RayEngine
from data_pipeline.prepare import prepare
from data_pipeline.testing import make_corpus, tiny_data_config

ray = pytest.importorskip("ray")

# Ray Data's own DataContext warns about its deprecated fields; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_ray_engine_is_byte_identical_to_local(local_ray, tmp_path, monkeypatch) -> None:
    make_corpus(tmp_path / "corpus")
    local = prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "local", engine="local"))
    # Several waves of several chunks each, so that ordering across tasks and waves matters.
    monkeypatch.setattr(prepare_module, "make_engine", lambda name, ray_address=None: RayEngine(wave_size=3))
    on_ray = prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "ray", engine="ray"))
    assert ray.is_initialized()  # the engine leaves a Ray instance it did not start running
    assert len(list(local.glob("train-*.arrow"))) > 2
    assert tree_bytes(on_ray) == tree_bytes(local)
