"""Corpus preparation: shards, manifest, tokenizer, metrics, split, bad input, atomicity."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import data_pipeline.prepare as prepare_module
from data_pipeline.config import DataConfig, register_configs
from data_pipeline.prepare import assign_splits, ensure_prepared, prepare
from data_pipeline.source import SourceError, resolve_sources
from data_pipeline.testing import make_corpus, tiny_data_config
from data_pipeline.tokenize import TokenizerMismatchError, load_tokenizer, token_dtype

ROOT = Path(__file__).resolve().parents[1]


def read_rows(out: Path, split: str) -> list[dict]:
    """Every row of a split, read with plain pyarrow (the shards are ordinary IPC streams)."""
    rows = []
    for path in sorted(out.glob(f"{split}-*.arrow")):
        with pa.memory_map(str(path)) as source:
            rows += ipc.open_stream(source).read_all().to_pylist()
    return rows


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = tiny_data_config(corpus["directory"], out)
    prepare(cfg)
    return out, cfg


def test_every_document_once_in_order_with_eos(prepared, corpus) -> None:
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = load_tokenizer(out)
    eos_id = manifest["tokenizer"]["eos_id"]
    rows = read_rows(out, "train") + read_rows(out, "validation") + read_rows(out, "calibration")
    assert sorted(r["doc_id"] for r in rows) == list(range(len(corpus["texts"])))  # each split's own documents
    assert manifest["num_documents"] == len(rows) and manifest["num_tokens"] == sum(r["n_tokens"] for r in rows)
    for row in rows:
        tokens = row["tokens"]
        assert tokens[-1] == eos_id and eos_id not in tokens[:-1]
        assert tokenizer.decode(tokens[:-1]) == corpus["texts"][row["doc_id"]]
    sources = {r["doc_id"]: r["source"] for r in rows}
    assert sources[0].endswith("records.jsonl:1") and sources[15].endswith("rows.parquet:0:0")
    assert sources[len(rows) - 1].endswith("doc039.txt")


def test_text_spelling_eos_is_not_a_boundary(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("x = '<|endoftext|>' " * 20)
    (tmp_path / "c" / "b.txt").write_text("plain text " * 20)
    out = prepare(tiny_data_config(tmp_path / "c", tmp_path / "out", validation_fraction=0.0))
    rows = read_rows(out, "train")
    for row in rows:
        assert row["tokens"].count(0) == 1 and row["tokens"][-1] == 0


def test_schema_and_narrowest_token_type(prepared) -> None:
    out, _ = prepared
    with pa.memory_map(str(out / "train-00000.arrow")) as source:
        schema = ipc.open_stream(source).schema
    assert schema.field("tokens").type == pa.list_(pa.uint16())
    assert schema.field("doc_id").type == pa.int64() and schema.field("n_tokens").type == pa.int32()
    for name in ("compression", "rarity", "length_pct", "compression_pct", "rarity_pct"):
        assert schema.field(name).type == pa.float32()
    assert [token_dtype(v).name for v in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


def test_shards_are_bounded_and_described(prepared) -> None:
    out, cfg = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    train_shards = manifest["splits"]["train"]["shards"]
    assert len(train_shards) >= 3
    assert sum(len(s["record_batches"]) for s in train_shards) > len(train_shards)  # several batches per shard
    for split, info in manifest["splits"].items():
        assert info["num_documents"] == len(read_rows(out, split))
        for shard in info["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == shard["num_bytes"] <= cfg["shard_max_bytes"]
            for batch in shard["record_batches"]:
                assert zlib.crc32(data[batch["offset"]:batch["offset"] + batch["length"]]) == batch["crc32"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".arrow") == \
        sorted(s["file"] for info in manifest["splits"].values() for s in info["shards"])


def test_metrics_match_plain_python_references(prepared, corpus) -> None:
    out, _ = prepared
    rows = read_rows(out, "train") + read_rows(out, "validation") + read_rows(out, "calibration")
    train_ids = {r["doc_id"] for r in read_rows(out, "train")}
    counts = Counter(t for r in rows for t in r["tokens"])
    total = sum(counts.values())
    for row in rows:
        text = corpus["texts"][row["doc_id"]]
        assert row["n_tokens"] == len(row["tokens"])
        raw = text.encode()
        assert row["compression"] == pytest.approx(len(zlib.compress(raw, 6)) / len(raw), rel=1e-6)
        rarity = sum(-math.log(counts[t] / total) for t in row["tokens"]) / len(row["tokens"])
        assert row["rarity"] == pytest.approx(rarity, rel=1e-5)
    for metric, column in (("length", "n_tokens"), ("compression", "compression"), ("rarity", "rarity")):
        reference = [r[column] for r in rows if r["doc_id"] in train_ids]
        for row in rows:
            below = sum(1 for v in reference if v < row[column])
            assert row[f"{metric}_pct"] == pytest.approx(100.0 * below / len(reference), abs=1e-4)
    assert min(r["length_pct"] for r in rows if r["doc_id"] in train_ids) == 0.0
    manifest = json.loads((out / "manifest.json").read_text())
    lengths = [r["n_tokens"] for r in rows]
    assert manifest["metrics"]["length"]["all"]["max"] == max(lengths)
    assert manifest["metrics"]["rarity"]["all"]["p50"] == pytest.approx(np.percentile([r["rarity"] for r in rows], 50),
                                                                        rel=1e-6)


def test_held_out_splits_by_content_hash_share_no_document(prepared, corpus) -> None:
    out, cfg = prepared
    texts = corpus["texts"]
    keys = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
    by_hash = sorted(range(len(texts)), key=lambda i: (keys[i], i))
    num_validation = round(cfg["validation_fraction"] * len(texts))
    num_calibration = round(cfg["calibration_fraction"] * len(texts))
    ids = {split: sorted(r["doc_id"] for r in read_rows(out, split))
           for split in ("train", "validation", "calibration")}
    assert ids["validation"] == sorted(by_hash[:num_validation])
    assert ids["calibration"] == sorted(by_hash[num_validation:num_validation + num_calibration])
    assert ids["train"] == sorted(by_hash[num_validation + num_calibration:])
    for a, b in (("train", "validation"), ("train", "calibration"), ("validation", "calibration")):
        assert not set(ids[a]) & set(ids[b]) and not {texts[i] for i in ids[a]} & {texts[i] for i in ids[b]}, (a, b)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"]["num_validation_documents"] == num_validation > 0
    assert manifest["split"]["num_calibration_documents"] == num_calibration > 0
    assert {s: manifest["splits"][s]["num_documents"] for s in ids} == {s: len(v) for s, v in ids.items()}


def test_split_sizes_at_the_edges() -> None:
    keys = np.array([5, 3, 9, 1, 7], dtype=np.uint64)  # hash order: 3, 1, 0, 4, 2
    assert assign_splits(keys, 0.2, 0.4).tolist() == [2, 2, 0, 1, 0]
    assert assign_splits(keys, 0.0, 0.0).tolist() == [0] * 5
    assert assign_splits(keys, 0.01, 0.01).tolist() == [0, 2, 0, 1, 0]  # a nonzero fraction gets one document
    assert assign_splits(keys[:2], 0.5, 0.4).tolist() == [0, 1]  # one document always trains; validation first
    assert assign_splits(keys[:1], 0.5, 0.4).tolist() == [0]
    with pytest.raises(ValueError, match="validation_fraction \\+ calibration_fraction must be below 1"):
        DataConfig(validation_fraction=0.5, calibration_fraction=0.5)
    with pytest.raises(ValueError, match="calibration_fraction must be in"):
        DataConfig(calibration_fraction=-0.1)


def test_output_is_deterministic_and_independent_of_chunking(prepared, corpus, tmp_path) -> None:
    out, cfg = prepared
    again = prepare({**cfg, "output": str(tmp_path / "again"), "chunk_bytes": 1 << 20})
    assert tree_bytes(again) == tree_bytes(out)


def test_manifest_contents(prepared) -> None:
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline_version"] == 2
    assert manifest["vocab_size"] == 320 and manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["trained"] is True and manifest["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert set(manifest["metrics"]) == {"length", "compression", "rarity"}
    assert manifest["read"]["num_undecodable_bytes"] == 0
    assert "time" not in json.dumps(manifest)  # no timestamps: same input, same bytes


def test_undecodable_bytes_are_replaced_and_counted(tmp_path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "good.txt").write_text("perfectly fine text " * 10)
    # Two invalid bytes, then a sequence cut after 2 of its 3 bytes: 4 bytes, 3 replacements
    # (under a tenth of the file: text with a few bad bytes, not a binary file).
    (corpus / "bad.txt").write_bytes(b"ok \xff\xfe then more text and a cut \xe2\x82" + b" and text" * 4)
    (corpus / "empty.txt").write_bytes(b"   \n")
    out = prepare(tiny_data_config(corpus, tmp_path / "out", validation_fraction=0.0))
    read = json.loads((out / "manifest.json").read_text())["read"]
    assert read["num_undecodable_bytes"] == 4
    assert read["num_documents_with_undecodable_bytes"] == 1
    assert read["num_empty_documents"] == 1
    tokenizer = load_tokenizer(out)
    texts = [tokenizer.decode(r["tokens"][:-1]) for r in read_rows(out, "train")]
    assert any(t.startswith("ok \ufffd\ufffd then more text and a cut \ufffd and text") for t in texts)


def _bad_sources(tmp_path: Path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_files").mkdir()
    (tmp_path / "empty_files" / "a.txt").write_text("")
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"body": "text"}) + "\n")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["text"]}), tmp_path / "wrong.parquet")
    return {
        "missing": ([str(tmp_path / "nope")], {}, "nope"),
        "glob": ([str(tmp_path / "*.nothing")], {}, "*.nothing"),
        "empty_dir": ([str(tmp_path / "empty_dir")], {}, "empty_dir"),
        "empty_files": ([str(tmp_path / "empty_files")], {}, "empty corpus"),
        "jsonl_field": ([str(tmp_path / "wrong.jsonl")], {"text_field": "text"},
                        "wrong.jsonl:1: no field data.text_field='text'"),
        "parquet_column": ([str(tmp_path / "wrong.parquet")], {"text_column": "content"},
                           "no column data.text_column='content'"),
    }


@pytest.mark.parametrize("case", ["missing", "glob", "empty_dir", "empty_files", "jsonl_field", "parquet_column"])
def test_bad_sources_fail_before_any_work(case, tmp_path, monkeypatch) -> None:
    sources, overrides, message = _bad_sources(tmp_path)[case]

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the sources were checked")

    monkeypatch.setattr(prepare_module, "train_tokenizer", no_work)
    monkeypatch.setattr(prepare_module, "_build", no_work)
    cfg = {"sources": sources, "output": str(tmp_path / "out"), **overrides}
    with pytest.raises(SourceError, match=None) as info:
        prepare(cfg)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unparseable_record_errors_or_is_skipped(tmp_path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    lines = [json.dumps({"text": f"record number {i} " * 5}) for i in range(6)]
    lines[3] = '{"text": "cut off'
    (corpus / "r.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"r\.jsonl:4"):
        prepare(tiny_data_config(corpus, tmp_path / "out"))
    out = prepare(tiny_data_config(corpus, tmp_path / "out", on_corrupt="skip"))
    read = json.loads((out / "manifest.json").read_text())["read"]
    assert read["num_skipped_records"] == 1 and "r.jsonl:4" in read["skipped_records"][0]
    assert json.loads((out / "manifest.json").read_text())["num_documents"] == 5


def test_interrupted_prepare_leaves_nothing_that_looks_complete(corpus, tmp_path, monkeypatch) -> None:
    out = tmp_path / "data"
    cfg = tiny_data_config(corpus["directory"], out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    prepare(cfg)
    before = tree_bytes(out)
    monkeypatch.setattr(prepare_module, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare({**cfg, "vocab_size": 300})
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_ensure_prepared_only_when_missing_or_stale(corpus, tmp_path, monkeypatch) -> None:
    import shutil

    sources = tmp_path / "corpus"
    shutil.copytree(corpus["directory"], sources)
    cfg = tiny_data_config(sources, tmp_path / "data")
    calls = []
    real_prepare = prepare_module.prepare

    def counting_prepare(c):
        calls.append(c)
        return real_prepare(c)

    monkeypatch.setattr(prepare_module, "prepare", counting_prepare)
    out = ensure_prepared(cfg)
    assert len(calls) == 1 and (out / "manifest.json").is_file()
    ensure_prepared(cfg)
    ensure_prepared({**cfg, "seq_len": 64, "curriculum": {"schedule": "fixed_linear"}})  # loader-only keys
    assert len(calls) == 1
    ensure_prepared({**cfg, "vocab_size": 300})
    assert len(calls) == 2
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 300
    (sources / "text" / "doc000.txt").write_text("a changed document, longer than before\n")
    ensure_prepared({**cfg, "vocab_size": 300})
    assert len(calls) == 3
    (out / "manifest.json").unlink()
    ensure_prepared({**cfg, "vocab_size": 300})
    assert len(calls) == 4


def test_existing_tokenizer_file_is_used(prepared, corpus, tmp_path) -> None:
    out, cfg = prepared
    tokenizer_file = tmp_path / "my_tokenizer.json"
    tokenizer_file.write_bytes((out / "tokenizer.json").read_bytes())
    again = prepare({**cfg, "output": str(tmp_path / "again"), "tokenizer": str(tokenizer_file), "vocab_size": 999})
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["tokenizer"]["trained"] is False and manifest["vocab_size"] == 320
    assert (again / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert read_rows(again, "train") == read_rows(out, "train")
    with pytest.raises(ValueError, match="data.eos_token='<eos>'"):
        prepare({**cfg, "output": str(tmp_path / "x"), "tokenizer": str(tokenizer_file), "eos_token": "<eos>"})
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        prepare({**cfg, "output": str(tmp_path / "x"), "tokenizer": str(tmp_path / "missing.json")})


def test_tokenizer_that_does_not_match_the_manifest_is_an_error(prepared, tmp_path) -> None:
    import shutil

    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    load_tokenizer(copy)
    text = (copy / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text(text.replace('"the"', '"teh"', 1) if '"the"' in text else text + " ")
    with pytest.raises(TokenizerMismatchError, match="tokenizer.json"):
        load_tokenizer(copy)


def test_default_corpus_is_the_standard_library() -> None:
    files = resolve_sources([])
    stdlib = Path(sysconfig.get_paths()["stdlib"]).absolute()
    names = {f.path.relative_to(stdlib).as_posix() for f in files}
    assert {"os.py", "json/__init__.py"} <= names
    assert all(f.path.suffix == ".py" and "site-packages" not in f.path.parts for f in files)
    assert len(files) > 500


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="data.vocab_sise"):
        DataConfig.from_any({"vocab_sise": 3})
    with pytest.raises(ValueError, match="data.curriculum.shedule"):
        DataConfig.from_any({"curriculum": {"shedule": "fixed_linear"}})
    with pytest.raises(ValueError, match="DataConfig.engine"):
        DataConfig.from_any({"engine": "spark"})
    with pytest.raises(ValueError, match="CurriculumConfig.difficulty must end at 100"):
        DataConfig.from_any({"curriculum": {"schedule": "fixed_discrete", "difficulty": [10, 50], "max_step": [5]}})
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="data_prepare", overrides=["data.sources=[a,b]", "data.engine=ray"])
        assert DataConfig.from_any(cfg.data).sources == ["a", "b"]
        with pytest.raises(ConfigCompositionException, match="vocab_sise"):
            compose(config_name="data_prepare", overrides=["data.vocab_sise=3"])


def test_hydra_entry_point(corpus, tmp_path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", f"data.sources=[{corpus['directory']}]",
         f"data.output={out}", "data.vocab_size=300", "data.text_column=content"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 0, result.stderr
    assert f"prepared {out}" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # Hydra wrote no outputs/ directory


# ---------------------------------------------------------------- data.output never replaces user files


def file_hashes(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def no_work(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("work started before data.output was checked")

    monkeypatch.setattr(prepare_module, "train_tokenizer", fail)
    monkeypatch.setattr(prepare_module, "_build", fail)


@pytest.mark.parametrize("case", ["equal", "inside", "contains", "glob", "tokenizer"])
def test_output_overlapping_a_source_is_refused_before_any_work(case, corpus, tmp_path, monkeypatch) -> None:
    import shutil

    sources = tmp_path / "corpus"
    shutil.copytree(corpus["directory"], sources)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tok.json").write_text("{}")
    cfg = {
        "equal": tiny_data_config(sources, sources),
        "inside": tiny_data_config(sources, sources / "text" / "prepared"),
        "contains": tiny_data_config(sources / "text", sources),
        "glob": tiny_data_config(f"{tmp_path}/*", tmp_path / "prepared"),
        "tokenizer": tiny_data_config(sources, tmp_path / "out", tokenizer=str(tmp_path / "out" / "tok.json")),
    }[case]
    message = {"equal": f"data.output={sources} is data.sources[0]={sources}",
               "inside": f"data.output={sources}/text/prepared is inside data.sources[0]={sources}",
               "contains": f"data.output={sources} contains data.sources[0]={sources}/text",
               "glob": f"data.output={tmp_path}/prepared is matched by data.sources[0]={tmp_path}/*",
               "tokenizer": f"data.output={tmp_path}/out contains data.tokenizer={tmp_path}/out/tok.json"}[case]
    before = file_hashes(tmp_path)
    no_work(monkeypatch)
    for entry_point in (prepare, ensure_prepared):
        with pytest.raises(ValueError) as info:
            entry_point(cfg)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert file_hashes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"], "no lock or temporary file"


def test_output_replaces_only_a_previous_output_or_an_empty_directory(prepared, corpus, tmp_path,
                                                                      monkeypatch) -> None:
    from moe.checkpoint import ReplaceRefusedError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "file").write_text("precious")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    before = file_hashes(tmp_path)
    with monkeypatch.context() as patch:
        no_work(patch)
        for name, reason in (("mine", "non-empty directory that is not the output of a previous prepare"),
                             ("file", "existing file"), ("link", "symbolic link")):
            with pytest.raises(ReplaceRefusedError, match=f"refusing to replace data.output={tmp_path / name}: "
                                                          f"it is an? {reason}"):
                prepare(tiny_data_config(corpus["directory"], tmp_path / name))
    assert file_hashes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "mine"]

    out, cfg = prepared
    assert prepare_module.is_prepared_directory(out)
    again = tmp_path / "again"
    again.mkdir()  # an empty directory may be written
    prepare({**cfg, "output": str(again)})
    prepare({**cfg, "output": str(again), "vocab_size": 300})  # a previous output is replaced
    assert json.loads((again / "manifest.json").read_text())["vocab_size"] == 300


# ---------------------------------------------------------------- damaged or unusual sources


def test_parquet_text_column_of_integers_is_refused_before_work(tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "c" / "numbers.parquet")
    no_work(monkeypatch)
    with pytest.raises(SourceError, match=r"numbers\.parquet: column data.text_column='text' holds int64, not text"):
        prepare({"sources": [str(tmp_path / "c")], "output": str(tmp_path / "out")})


def jsonl_with_bad_first_line(directory: Path) -> Path:
    directory.mkdir()
    lines = ['{"text": "cut off'] + [json.dumps({"text": f"record number {i} " * 5}) for i in range(5)]
    (directory / "r.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_malformed_first_jsonl_line_errors_or_is_skipped(tmp_path, caplog) -> None:
    corpus = jsonl_with_bad_first_line(tmp_path / "c")
    with pytest.raises(SourceError, match=r"r\.jsonl:1: not valid JSON"):
        prepare(tiny_data_config(corpus, tmp_path / "out"))
    with caplog.at_level("WARNING"):
        out = prepare(tiny_data_config(corpus, tmp_path / "out", on_corrupt="skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["read"]["num_skipped_records"] == 1 and "r.jsonl:1" in manifest["read"]["skipped_records"][0]
    assert manifest["num_documents"] == 5
    assert [r.getMessage() for r in caplog.records if "r.jsonl:1" in r.getMessage()] == \
        [f"skipping {corpus / 'r.jsonl'}:1: {manifest['read']['skipped_records'][0].split(': ', 1)[1]} "
         "(data.on_corrupt=skip)"]


def test_truncated_parquet_errors_or_is_skipped(corpus, tmp_path, caplog) -> None:
    import shutil

    sources = tmp_path / "c"
    shutil.copytree(corpus["directory"], sources)
    data = (sources / "rows.parquet").read_bytes()
    (sources / "rows.parquet").write_bytes(data[:len(data) // 2])
    with pytest.raises(SourceError, match=r"rows\.parquet: not a readable Parquet file"):
        prepare(tiny_data_config(sources, tmp_path / "out"))
    with caplog.at_level("WARNING"):
        out = prepare(tiny_data_config(sources, tmp_path / "out", on_corrupt="skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_documents"] == len(corpus["texts"]) - 10  # the file's 10 rows
    assert manifest["read"]["num_skipped_records"] == 1
    assert any(f"skipping {sources / 'rows.parquet'}: cannot read Parquet" in r.getMessage() for r in caplog.records)


def test_binary_file_errors_or_is_skipped(corpus, tmp_path, caplog) -> None:
    import shutil

    sources = tmp_path / "c"
    shutil.copytree(corpus["directory"], sources)
    shutil.copyfile(sys.executable, sources / "text" / "python")
    # Mostly not UTF-8 but no NUL byte: text in another encoding, kept with a warning naming it
    # (the default corpus has such files: the standard library's KOI8-R test module).
    (sources / "text" / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, ".encode("latin-1") * 3)
    shutil.move(sources / "text" / "python", tmp_path / "python")
    with caplog.at_level("WARNING"):
        out = prepare(tiny_data_config(sources, tmp_path / "out"))
    assert json.loads((out / "manifest.json").read_text())["read"]["num_undecodable_bytes"] == 12
    assert any("text/latin1.txt: 12 of its 57 bytes are not UTF-8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (sources / "text" / "latin1.txt").unlink()
    shutil.move(tmp_path / "python", sources / "text" / "python")
    with pytest.raises(SourceError, match=r"text/python: not text: it contains NUL bytes"):
        prepare(tiny_data_config(sources, tmp_path / "out"))
    with caplog.at_level("WARNING"):
        out = prepare(tiny_data_config(sources, tmp_path / "out", on_corrupt="skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_documents"] == len(corpus["texts"])
    assert manifest["read"]["num_skipped_records"] == 1 and manifest["read"]["num_undecodable_bytes"] == 0
    assert [r.getMessage() for r in caplog.records if "text/python" in r.getMessage()] == \
        [f"skipping {sources / 'text' / 'python'}: {manifest['read']['skipped_records'][0].split(': ', 1)[1]} "
         "(data.on_corrupt=skip)"]


def test_long_documents_reach_the_tokenizer_in_bounded_pieces(corpus, tmp_path, monkeypatch) -> None:
    import shutil

    import data_pipeline.tokenize as tokenize_module

    sources = tmp_path / "c"
    shutil.copytree(corpus["directory"], sources)
    # One long line of words, with doubled spaces and a few newlines.
    long_text = " ".join(corpus["texts"]).replace("of the", "of  the")
    (sources / "text" / "long.txt").write_text(long_text)
    reference = prepare(tiny_data_config(sources, tmp_path / "whole"))

    seen: list[int] = []
    real_train, real_encode = prepare_module.train_tokenizer, tokenize_module.encode_documents

    def recording_train(texts, **kwargs):
        return real_train((seen.append(len(t)) or t for t in texts), **kwargs)

    class RecordingTokenizer:
        def __init__(self, tokenizer):
            object.__setattr__(self, "tokenizer", tokenizer)

        def __setattr__(self, name, value):
            setattr(self.tokenizer, name, value)

        def encode_batch_fast(self, texts):
            seen.extend(len(t) for t in texts)
            return self.tokenizer.encode_batch_fast(texts)

    monkeypatch.setattr(tokenize_module, "MAX_PIECE_CHARS", 1000)
    monkeypatch.setattr(tokenize_module, "ENCODE_BATCH_CHARS", 1500)
    monkeypatch.setattr(prepare_module, "train_tokenizer", recording_train)
    monkeypatch.setattr("data_pipeline.engine.encode_documents",
                        lambda tokenizer, *args, **kwargs: real_encode(RecordingTokenizer(tokenizer), *args, **kwargs))
    pieces = prepare(tiny_data_config(sources, tmp_path / "pieces"))
    assert len(long_text) > 20_000 and seen and max(seen) <= 1000
    # Cuts fall where byte-level pre-tokenization splits anyway: the same tokenizer, ids and bytes.
    assert tree_bytes(pieces) == tree_bytes(reference)

    # A stretch without any space is cut mid-word: still bounded, deterministic and lossless.
    (sources / "text" / "long.txt").write_text(long_text + "x" * 5000 + " end")
    seen.clear()
    pieces = prepare(tiny_data_config(sources, tmp_path / "pieces"))
    assert max(seen) <= 1000
    assert tree_bytes(prepare(tiny_data_config(sources, tmp_path / "again"))) == tree_bytes(pieces)
    rows = read_rows(pieces, "train") + read_rows(pieces, "validation")
    long_row = next(r for r in rows if r["source"].endswith("long.txt"))
    assert load_tokenizer(pieces).decode(long_row["tokens"][:-1]) == long_text + "x" * 5000 + " end"


def test_split_long_text_cuts_between_words() -> None:
    from data_pipeline.tokenize import split_long_text

    text = "alpha beta  gamma\ndelta " * 50 + "y" * 300
    for max_chars in (1, 7, 40, 100, 10_000):
        pieces = list(split_long_text(text, max_chars))
        assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
    pieces = list(split_long_text(text, 100))
    assert all(p[-1] != " " and (p[0] in " \n" or i == 0) for i, p in enumerate(pieces[:-3]))


def test_perplexity_metric_without_score_with_is_refused() -> None:
    with pytest.raises(ValueError, match="data.curriculum.metric=perplexity needs data.score_with"):
        DataConfig.from_any({"curriculum": {"schedule": "fixed_linear", "metric": "perplexity"}})
    DataConfig.from_any({"score_with": "ckpt", "curriculum": {"metric": "perplexity"}})
