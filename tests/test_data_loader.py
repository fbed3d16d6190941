"""The curriculum loader: packing, pacing, elastic determinism, exact resumption, corruption."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from data_pipeline.config import CurriculumConfig
from data_pipeline.curriculum import pace
from data_pipeline.loader import CurriculumLoader
from data_pipeline.prepare import prepare
from data_pipeline.shards import ShardError
from data_pipeline.testing import make_corpus, tiny_data_config
from data_pipeline.tokenize import TokenizerMismatchError

SEQ_LEN, GLOBAL_BATCH = 16, 8
KEYS = ("input_ids", "targets", "doc_ids")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    make_corpus(root / "corpus")
    return prepare(tiny_data_config(root / "corpus", root / "prepared"))


@pytest.fixture(scope="module")
def docs(data_dir) -> dict[int, dict]:
    """doc_id -> row (tokens, percentiles, split), read with plain pyarrow."""
    rows = {}
    for path in sorted(data_dir.glob("*.arrow")):
        with pa.memory_map(str(path)) as source:
            for row in ipc.open_stream(source).read_all().to_pylist():
                rows[row["doc_id"]] = {**row, "shard": path.name}
    return rows


def make_loader(data_dir: Path, **kwargs) -> CurriculumLoader:
    kwargs = {"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH, "prefetch": 0, "shuffle_buffer": 16, **kwargs}
    return CurriculumLoader(data_dir, **kwargs)


def take(loader: CurriculumLoader, n: int) -> list[dict[str, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), f"{key} differs at batch {step}"


# ------------------------------------------------------------------ pacing


def deepspeed_difficulty(config: dict, step: int) -> float:
    scheduler_module = pytest.importorskip("deepspeed.runtime.data_pipeline.curriculum_scheduler")
    return scheduler_module.CurriculumScheduler(config).get_difficulty(step)


@pytest.mark.parametrize("schedule, kwargs", [
    ("fixed_linear", {"total_curriculum_step": 50, "min_difficulty": 10, "difficulty_step": 1}),
    ("fixed_linear", {"total_curriculum_step": 37, "min_difficulty": 10, "difficulty_step": 8}),
    ("fixed_root", {"total_curriculum_step": 50, "min_difficulty": 5, "difficulty_step": 1, "root_degree": 2}),
    ("fixed_root", {"total_curriculum_step": 64, "min_difficulty": 20, "difficulty_step": 4, "root_degree": 3}),
    ("fixed_discrete", {"difficulty": [20, 60, 100], "max_step": [5, 12]}),
])
def test_pace_matches_deepspeed(schedule, kwargs) -> None:
    curriculum = CurriculumConfig(schedule=schedule, **kwargs)
    schedule_config = {k: kwargs[k] for k in ("total_curriculum_step", "difficulty_step", "root_degree",
                                              "difficulty", "max_step") if k in kwargs}
    if schedule == "fixed_linear":
        schedule_config["root_degree"] = 1
    reference = {"min_difficulty": kwargs.get("min_difficulty", 0), "max_difficulty": 100,
                 "schedule_type": schedule, "schedule_config": schedule_config}
    horizon = kwargs.get("total_curriculum_step", 20)
    for step in range(horizon):
        assert pace(step, curriculum) == deepspeed_difficulty(reference, step), step
    # After the curriculum every document is eligible, even where DeepSpeed's
    # rounding to difficulty_step would stop short of 100.
    assert all(pace(step, curriculum) == 100 for step in range(horizon, horizon + 5))
    assert pace(0, CurriculumConfig(schedule="none")) == 100


# ------------------------------------------------------------------ packing


def test_batches_are_packed_documents(data_dir, docs) -> None:
    batches = take(make_loader(data_dir, schedule="none"), 30)
    for batch in batches:
        for key in KEYS:
            assert batch[key].shape == (GLOBAL_BATCH, SEQ_LEN) and batch[key].dtype == torch.int64
        assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
        assert torch.equal(batch["targets"][:-1, -1], batch["input_ids"][1:, 0])  # stride seq_len
        batch["targets"][0, 0] = -100  # targets are not a view of input_ids
        assert batch["input_ids"][0, 1] != -100
    for before, after in zip(batches, batches[1:]):
        assert after["input_ids"][0, 0] == before["targets"][-1, -1]  # batches continue the same stream

    tokens = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    doc_ids = torch.cat([b["doc_ids"].flatten() for b in batches]).tolist()
    runs, start = [], 0
    for i in range(1, len(tokens) + 1):  # a run ends where the document changes or after its EOS
        if i == len(tokens) or doc_ids[i] != doc_ids[i - 1] or tokens[i - 1] == 0:
            runs.append((doc_ids[start], tokens[start:i]))
            start = i
    assert len(runs) > 10
    first_doc, first_tokens = runs[0]
    assert docs[first_doc]["tokens"][-len(first_tokens):] == first_tokens
    for doc_id, run in runs[1:-1]:
        assert run == docs[doc_id]["tokens"], doc_id
        assert docs[doc_id]["shard"].startswith("train")
    last_doc, last_tokens = runs[-1]
    assert docs[last_doc]["tokens"][:len(last_tokens)] == last_tokens


def test_plain_shuffle_covers_every_training_document(data_dir, docs) -> None:
    train = {d for d, row in docs.items() if row["shard"].startswith("train")}
    num_tokens = sum(len(docs[d]["tokens"]) for d in train)
    loader = make_loader(data_dir, schedule="none", global_batch_size=16)
    seen = set()
    for batch in take(loader, 3 * num_tokens // (16 * SEQ_LEN)):
        seen.update(batch["doc_ids"].flatten().tolist())
    assert seen == train
    other_seed = take(make_loader(data_dir, schedule="none", seed=1), 3)
    assert not torch.equal(other_seed[0]["input_ids"], take(make_loader(data_dir, schedule="none"), 1)[0]["input_ids"])


def document_order(batches: list[dict]) -> list[int]:
    """The documents in stream order (a document starts where the doc_id changes or after an EOS)."""
    tokens = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    doc_ids = torch.cat([b["doc_ids"].flatten() for b in batches]).tolist()
    return [doc_ids[i] for i in range(len(tokens)) if i == 0 or doc_ids[i] != doc_ids[i - 1] or tokens[i - 1] == 0]


def test_every_pass_is_a_new_permutation_of_blocks_and_rows(data_dir, docs) -> None:
    train = sorted(d for d, row in docs.items() if row["shard"].startswith("train"))
    num_tokens = sum(len(docs[d]["tokens"]) for d in train)
    loader = make_loader(data_dir, schedule="none", shuffle_buffer=0)
    order = document_order(take(loader, 2 * num_tokens // (GLOBAL_BATCH * SEQ_LEN) + 2))
    first, second = order[:len(train)], order[len(train):2 * len(train)]
    assert sorted(first) == train and sorted(second) == train
    assert first != second
    block_of = {}
    for path in sorted(data_dir.glob("train-*.arrow")):
        with pa.memory_map(str(path)) as source:
            for index, batch in enumerate(ipc.open_stream(source)):
                block_of.update({d: (path.name, index) for d in batch.column("doc_id").to_pylist()})

    def block_sequence(documents: list[int]) -> list[tuple[str, int]]:
        return [block_of[d] for i, d in enumerate(documents) if i == 0 or block_of[d] != block_of[documents[i - 1]]]

    assert len(block_sequence(first)) == len(set(block_of.values()))  # a block's rows come together
    assert block_sequence(first) != block_sequence(second)


# ---------------------------------------------------------------- curriculum


@pytest.mark.parametrize("metric, curriculum", [
    ("length", {"schedule": "fixed_discrete", "difficulty": [20, 60, 100], "max_step": [5, 10]}),
    ("rarity", {"schedule": "fixed_linear", "total_curriculum_step": 12, "min_difficulty": 15}),
    ("compression", {"schedule": "fixed_root", "total_curriculum_step": 12, "min_difficulty": 15, "root_degree": 2}),
])
def test_only_eligible_documents_until_the_curriculum_ends(data_dir, docs, metric, curriculum) -> None:
    loader = make_loader(data_dir, metric=metric, **curriculum)
    config = CurriculumConfig(metric=metric, **curriculum)
    column = f"{metric}_pct"
    late_hard = False
    for step, batch in enumerate(take(loader, 60)):
        percentiles = [docs[d][column] for d in set(batch["doc_ids"].flatten().tolist())]
        if step < 12:
            assert max(percentiles) <= pace(step, config), (step, max(percentiles))
        elif max(percentiles) > 60:
            late_hard = True
    assert late_hard, "after the curriculum the hard documents must come back"
    assert loader.step == 60 and loader.pace == 100


def test_step_tracking_and_set_step(data_dir, docs) -> None:
    loader = make_loader(data_dir, schedule="fixed_linear", total_curriculum_step=1000, min_difficulty=0)
    config = CurriculumConfig(schedule="fixed_linear", total_curriculum_step=1000, min_difficulty=0)
    take(loader, 3)
    assert loader.step == 3 and loader.pace == pace(3, config)
    loader.set_step(990)
    assert loader.step == 990 and loader.pace == pace(990, config) >= 99
    assert loader.state_dict()["step"] == 990
    take(loader, 2)
    assert loader.step == 992


# ---------------------------------------------------------- data parallelism


def test_union_over_ranks_is_the_same_for_any_world_size(data_dir) -> None:
    kwargs = {"schedule": "fixed_linear", "metric": "compression", "total_curriculum_step": 8, "min_difficulty": 20}
    reference = take(make_loader(data_dir, **kwargs), 10)
    for world_size in (2, 4):
        per_rank = [take(make_loader(data_dir, rank=r, world_size=world_size, **kwargs), 10)
                    for r in range(world_size)]
        for step in range(10):
            for key in KEYS:
                assert per_rank[0][step][key].shape[0] == GLOBAL_BATCH // world_size
                union = torch.cat([per_rank[r][step][key] for r in range(world_size)])
                assert torch.equal(union, reference[step][key]), (world_size, step, key)


def test_batch_geometry_is_validated(data_dir) -> None:
    with pytest.raises(ValueError, match="divisible by world_size"):
        make_loader(data_dir, global_batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        make_loader(data_dir, rank=2, world_size=2)
    with pytest.raises(ValueError, match="metric='perplexity'"):
        make_loader(data_dir, schedule="fixed_linear", metric="perplexity")


# ---------------------------------------------------------------- resumption


RESUME_CURRICULUM = {"schedule": "fixed_discrete", "metric": "length", "difficulty": [30, 70, 100], "max_step": [4, 8]}


@pytest.mark.parametrize("stop, prefetch, resume_world_size", [
    (1, 0, 1), (4, 2, 1), (5, 3, 2), (9, 0, 4), (12, 1, 1),
])
def test_resume_reproduces_the_uninterrupted_stream(data_dir, stop, prefetch, resume_world_size) -> None:
    """Stops at several points (5 and 9 are the first steps of new curriculum phases)."""
    total = 14
    reference = take(make_loader(data_dir, **RESUME_CURRICULUM), total)
    first = make_loader(data_dir, prefetch=prefetch, **RESUME_CURRICULUM)
    assert_same_batches(take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.state_dict()))  # plain types: it goes into checkpoints
    first.close()
    assert state["step"] == stop
    resumed = []
    for rank in range(resume_world_size):
        loader = make_loader(data_dir, prefetch=prefetch, rank=rank, world_size=resume_world_size,
                             **RESUME_CURRICULUM)
        loader.load_state_dict(state)
        resumed.append(take(loader, total - stop))
        loader.close()
    union = [{key: torch.cat([resumed[r][i][key] for r in range(resume_world_size)]) for key in KEYS}
             for i in range(total - stop)]
    assert_same_batches(union, reference[stop:])


def test_prefetch_does_not_change_the_stream(data_dir) -> None:
    reference = take(make_loader(data_dir, **RESUME_CURRICULUM), 12)
    loader = make_loader(data_dir, prefetch=3, **RESUME_CURRICULUM)
    assert_same_batches(take(loader, 12), reference)
    thread = loader._thread._thread
    loader.close()
    assert not thread.is_alive()


def test_state_of_another_configuration_is_rejected(data_dir) -> None:
    state = make_loader(data_dir, **RESUME_CURRICULUM).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(data_dir, seed=1, **RESUME_CURRICULUM).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        make_loader(data_dir, global_batch_size=16, **RESUME_CURRICULUM).load_state_dict(state)


def test_streaming_does_not_grow_memory(data_dir) -> None:
    """Many passes over the corpus allocate nothing that stays (no per-document or per-pass caches)."""
    loader = make_loader(data_dir, schedule="fixed_linear", total_curriculum_step=100)
    batches = iter(loader)
    for _ in range(20):
        next(batches)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(400):  # about five passes
            next(batches)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, grown  # measured: about 5 KB


# ---------------------------------------------------------------- validation


def test_validation_split_is_deterministic_and_bounded(data_dir, docs) -> None:
    validation = sorted(d for d, row in docs.items() if row["shard"].startswith("validation"))
    stream = [t for d in validation for t in docs[d]["tokens"]]
    loader = make_loader(data_dir, split="validation", schedule="fixed_linear")
    assert loader.num_batches == (len(stream) - 1) // (GLOBAL_BATCH * SEQ_LEN) > 1
    first, second = list(loader), list(loader)
    assert len(first) == loader.num_batches
    assert_same_batches(first, second)
    tokens = torch.cat([b["input_ids"].flatten() for b in first]).tolist()
    assert tokens == stream[:len(tokens)]
    ranks = [list(make_loader(data_dir, split="validation", rank=r, world_size=2)) for r in range(2)]
    assert_same_batches([{k: torch.cat([ranks[0][i][k], ranks[1][i][k]]) for k in KEYS}
                         for i in range(len(first))], first)
    with pytest.raises(ValueError, match="one global batch needs 512 sequences"):
        make_loader(data_dir, split="validation", global_batch_size=512)


def test_from_config(data_dir) -> None:
    cfg = {"output": str(data_dir), "seq_len": 8, "seed": 3, "prefetch": 0,
           "curriculum": {"schedule": "fixed_linear", "metric": "rarity", "total_curriculum_step": 5}}
    loader = CurriculumLoader.from_config(cfg, global_batch_size=4, world_size=2, rank=1)
    batch = take(loader, 1)[0]
    assert batch["input_ids"].shape == (2, 8)
    assert loader.seed == 3 and loader.curriculum.metric == "rarity"


# ---------------------------------------------------------------- bad shards


@pytest.fixture()
def damaged(data_dir, tmp_path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(data_dir, copy)
    return copy


def shard_entry(directory: Path, name: str) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    return next(s for split in manifest["splits"].values() for s in split["shards"] if s["file"] == name)


def test_truncated_shard_names_shard_and_record_batch(damaged) -> None:
    entry = shard_entry(damaged, "train-00001.arrow")
    batch = entry["record_batches"][1]
    path = damaged / "train-00001.arrow"
    path.write_bytes(path.read_bytes()[:batch["offset"] + batch["length"] // 2])
    with pytest.raises(ShardError, match=r"train-00001\.arrow, record batch 1: truncated"):
        make_loader(damaged)


def test_modified_bytes_name_shard_and_record_batch(damaged) -> None:
    entry = shard_entry(damaged, "train-00002.arrow")
    batch = entry["record_batches"][0]
    path = damaged / "train-00002.arrow"
    data = bytearray(path.read_bytes())
    middle = batch["offset"] + batch["length"] - 40
    data[middle:middle + 4] = b"\x13\x37\x13\x37"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00002\.arrow, record batch 0: checksum mismatch"):
        make_loader(damaged)
    # Without checksums a broken message header is still caught by parsing.
    data[batch["offset"]:batch["offset"] + 16] = b"\x00" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00002\.arrow, record batch 0: unreadable"):
        make_loader(damaged, verify_checksums=False)


def test_corrupt_shards_are_skipped_and_reported(damaged, docs) -> None:
    reference_state = make_loader(damaged, **RESUME_CURRICULUM).state_dict()
    for name in ("train-00000.arrow", "train-00003.arrow"):
        path = damaged / name
        path.write_bytes(path.read_bytes()[:-100])
    loader = make_loader(damaged, on_corrupt="skip", **RESUME_CURRICULUM)
    assert [s["shard"] for s in loader.skipped_shards] == ["train-00000.arrow", "train-00003.arrow"]
    assert all("truncated" in s["reason"] for s in loader.skipped_shards)
    lost = {d for d, row in docs.items() if row["shard"] in ("train-00000.arrow", "train-00003.arrow")}
    seen = set()
    for batch in take(loader, 40):
        seen.update(batch["doc_ids"].flatten().tolist())
    assert seen and not seen & lost
    # A state saved before the shards broke: training continues at its step.
    loader.load_state_dict({**reference_state, "step": 6})
    assert loader.step == 6
    take(loader, 2)


def test_tokenizer_that_does_not_match_is_an_error(damaged) -> None:
    tokenizer = damaged / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")
    with pytest.raises(TokenizerMismatchError):
        make_loader(damaged)


def test_missing_manifest_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a prepared data directory"):
        make_loader(tmp_path)


# ---------------------------------------------------------------- the driver's check (check_prepared)


def check(data_dir: Path, **kwargs) -> None:
    from data_pipeline.prepare import check_prepared

    kwargs = {"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH, "need_validation": True,
              "on_corrupt": "error", **kwargs}
    check_prepared(data_dir, **kwargs)


def test_check_prepared_counts_validation_batches_as_the_loader_does(data_dir) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    num_tokens = manifest["splits"]["validation"]["num_tokens"]
    # seq_len 1: a global batch of G sequences needs G + 1 tokens, so G = num_tokens - 1 is the boundary.
    for seq_len, fits in ((1, num_tokens - 1), (SEQ_LEN, (num_tokens - 1) // SEQ_LEN)):
        check(data_dir, seq_len=seq_len, global_batch_size=fits)
        assert make_loader(data_dir, split="validation", seq_len=seq_len, global_batch_size=fits).num_batches == 1
        message = (f"the validation split of {data_dir} has {num_tokens} tokens in "
                   f"{manifest['splits']['validation']['num_documents']} documents, {(num_tokens - 1) // seq_len} "
                   f"sequences of seq_len {seq_len}; one global batch needs {fits + 1} sequences "
                   f"({(fits + 1) * seq_len + 1} tokens): raise data.validation_fraction (prepared with 0.1)")
        with pytest.raises(ValueError) as from_check:
            check(data_dir, seq_len=seq_len, global_batch_size=fits + 1)
        with pytest.raises(ValueError) as from_loader:
            make_loader(data_dir, split="validation", seq_len=seq_len, global_batch_size=fits + 1)
        assert str(from_check.value) == str(from_loader.value) and str(from_check.value).startswith(message)
    check(data_dir, global_batch_size=10 ** 6, need_validation=False)  # a run that does not evaluate


def test_check_prepared_names_a_damaged_shard_or_skips_it(damaged, caplog) -> None:
    validation = damaged / "validation-00000.arrow"
    intact = validation.read_bytes()
    batch = shard_entry(damaged, validation.name)["record_batches"][0]
    middle = batch["offset"] + batch["length"] - 40
    validation.write_bytes(intact[:middle] + bytes([intact[middle] ^ 1]) + intact[middle + 1:])
    with pytest.raises(ShardError, match=r"validation-00000\.arrow, record batch 0: checksum mismatch"):
        check(damaged, need_validation=False)
    validation.write_bytes(intact)
    path = damaged / "train-00001.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"corrupt shard .*train-00001\.arrow, record batch \d+: truncated"):
        check(damaged)
    with caplog.at_level("WARNING"):
        check(damaged, on_corrupt="skip")
    assert any("train-00001.arrow" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    for shard in damaged.glob("train-*.arrow"):
        shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"the train split of .* has no usable shard \(\d+ skipped as corrupt\)"):
        check(damaged, on_corrupt="skip")


def test_check_prepared_refuses_a_tokenizer_that_does_not_match(damaged) -> None:
    tokenizer = damaged / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + "\n")
    with pytest.raises(TokenizerMismatchError, match=r"tokenizer\.json has SHA-256"):
        check(damaged)
    tokenizer.unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing"):
        check(damaged)
    (damaged / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json is missing"):
        check(damaged)


def test_check_prepared_refuses_a_missing_or_tiny_validation_split(tmp_path) -> None:
    make_corpus(tmp_path / "corpus", num_text=38, num_jsonl=15, num_parquet=10)  # 63 documents
    none = prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "none", validation_fraction=0.0))
    with pytest.raises(ValueError, match=r"has no validation split \(prepared with data.validation_fraction=0.0 "
                                         r"from 63 documents\) but the run evaluates on it"):
        check(none)
    check(none, need_validation=False)
    tiny = prepare(tiny_data_config(tmp_path / "corpus", tmp_path / "tiny", validation_fraction=0.01))
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["splits"]["validation"]["num_documents"] == 1
    with pytest.raises(ValueError, match=r"has \d+ tokens in 1 documents, \d+ sequences of seq_len 16; one global "
                                         r"batch needs 64 sequences \(1025 tokens\): raise data.validation_fraction "
                                         r"\(prepared with 0.01\)"):
        check(tiny, global_batch_size=64)
