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
def local_ray(ray_cluster):
    yield ray_cluster


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


# ---------------------------------------------------------------- errors that cross a process boundary


def project_errors(tmp_path: Path) -> list[Exception]:
    from data_pipeline.manifest import ManifestError
    from data_pipeline.shards import ShardError
    from data_pipeline.source import SourceError
    from data_pipeline.tokenize import TokenizerMismatchError
    from moe.checkpoint import ReplaceRefusedError

    return [ShardError(tmp_path / "train-00001.arrow", 2, "checksum mismatch: the bytes were modified"),
            ShardError(tmp_path / "train-00002.arrow", None, "the file is missing"),
            SourceError(f"{tmp_path}/r.jsonl:4: not valid JSON"), ManifestError(f"{tmp_path}/manifest.json is missing"),
            TokenizerMismatchError(f"{tmp_path}/tokenizer.json has SHA-256 0123..."),
            ReplaceRefusedError(tmp_path / "corpus", "it is a non-empty directory", "data.output")]


def test_every_project_error_survives_pickling(tmp_path) -> None:
    import pickle

    for err in project_errors(tmp_path):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err) and copy.args == err.args
        assert vars(copy) == vars(err)


@pytest.mark.slow
def test_shard_error_reaches_the_ray_driver_intact(local_ray, tmp_path) -> None:
    from data_pipeline.shards import ShardError

    def open_shard(path: str) -> None:  # defined here so that Ray ships it by value (tests/ is no package)
        from data_pipeline.shards import ShardError

        raise ShardError(Path(path), 3, "checksum mismatch: the bytes were modified")

    shard = tmp_path / "train-00007.arrow"
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(ray.remote(open_shard).remote(str(shard)))
    cause = info.value.cause
    assert type(cause) is ShardError and (cause.shard, cause.batch_index) == (shard, 3)
    assert str(cause) == f"corrupt shard {shard}, record batch 3: checksum mismatch: the bytes were modified"
    assert isinstance(info.value, ShardError)  # Ray's error is also an instance of the cause
