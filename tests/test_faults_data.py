"""Fault matrix of the data side, through the real CLI (`python -m data_pipeline.prepare`).

Each case injects one fault (a dangerous data.output, a damaged or unusual
source, a bad config) and checks what a user sees: exit status 1, exactly one
`error:` line on stderr naming the culprit, no traceback, and every file that
existed before unchanged (the corpora and an unrelated directory are hashed
before and after). The on_corrupt=skip cases succeed with a warning naming the
file instead. The corpora are tiny and the vocabulary small, so that each run
costs about as much as starting Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.testing import make_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A clean corpus, damaged corpora, an unrelated directory and a file, and one prepared output."""
    root = tmp_path_factory.mktemp("faults")
    make_corpus(root / "corpus", num_text=8, num_jsonl=4, num_parquet=4)
    (root / "unrelated" / "sub").mkdir(parents=True)
    (root / "unrelated" / "notes.txt").write_text("not ours to delete\n")
    (root / "unrelated" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (root / "file.txt").write_text("a file, not a directory\n")

    def damaged(name: str) -> Path:
        directory = root / name
        shutil.copytree(root / "corpus", directory)
        return directory

    pq.write_table(pa.table({"content": [1, 2, 3]}), damaged("ints") / "numbers.parquet")
    bad_jsonl = damaged("bad_jsonl") / "records.jsonl"
    bad_jsonl.write_text('{"text": "cut off\n' + bad_jsonl.read_text())
    parquet = damaged("truncated") / "rows.parquet"
    parquet.write_bytes(parquet.read_bytes()[:parquet.stat().st_size // 2])
    shutil.copyfile("/bin/ls" if Path("/bin/ls").is_file() else sys.executable, damaged("binary") / "text" / "ls")

    result = cli(root / "corpus", root / "prepared")
    assert result.returncode == 0, result.stderr
    return root


def cli(source: Path, output: Path, *overrides: str, vocab_size: int = 300) -> subprocess.CompletedProcess:
    args = [f"data.sources=[{source}]", f"data.output={output}", f"data.vocab_size={vocab_size}",
            "data.text_column=content", *overrides]
    return subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def hashes(root: Path, skip: Optional[Path] = None) -> dict[str, str]:
    """sha256 of every file under `root` but those under `skip`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not (skip is not None and skip in p.parents)}


# (source, output, overrides, what the error line says); {root} is the fixture's directory.
REFUSED = {
    "output_is_the_source": ("corpus", "corpus", (), "data.output={root}/corpus is data.sources[0]={root}/corpus"),
    "output_inside_the_source": ("corpus", "corpus/text/prepared", (),
                                 "data.output={root}/corpus/text/prepared is inside data.sources[0]={root}/corpus"),
    "output_contains_the_source": ("corpus/text", "corpus", (),
                                   "data.output={root}/corpus contains data.sources[0]={root}/corpus/text"),
    "output_is_an_unrelated_directory": ("corpus", "unrelated", (),
                                         "refusing to replace data.output={root}/unrelated: it is a non-empty "
                                         "directory that is not the output of a previous prepare"),
    "output_is_a_file": ("corpus", "file.txt", (),
                         "refusing to replace data.output={root}/file.txt: it is an existing file"),
    "parquet_column_of_integers": ("ints", "out_ints", (),
                                   "{root}/ints/numbers.parquet: column data.text_column='content' holds int64, "
                                   "not text"),
    "malformed_first_jsonl_line": ("bad_jsonl", "out_bad_jsonl", (),
                                   "{root}/bad_jsonl/records.jsonl:1: not valid JSON"),
    "truncated_parquet": ("truncated", "out_truncated", (),
                          "{root}/truncated/rows.parquet: not a readable Parquet file"),
    "binary_file": ("binary", "out_binary", (), "{root}/binary/text/ls: not text: it contains NUL bytes"),
    "perplexity_without_score_with": ("corpus", "out_perplexity", ("data.curriculum.metric=perplexity",),
                                      "data.curriculum.metric=perplexity needs data.score_with"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_fault_is_refused_with_one_line_and_nothing_changes(world, case) -> None:
    source, output, overrides, message = REFUSED[case]
    before = hashes(world)
    result = cli(world / source, world / output, *overrides)
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: " + message.format(root=world)), errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert hashes(world) == before
    assert not (world / output).exists() or output in ("corpus", "unrelated", "file.txt")


SKIPPED = {
    "malformed_first_jsonl_line": ("bad_jsonl", "skipping {root}/bad_jsonl/records.jsonl:1: "),
    "truncated_parquet": ("truncated", "skipping {root}/truncated/rows.parquet: cannot read Parquet"),
    "binary_file": ("binary", "skipping {root}/binary/text/ls: not text: it contains NUL bytes"),
}


# Each of these prepares the whole corpus: `make test` runs one, `make test-slow` all.
@pytest.mark.parametrize("case", [case if case == "truncated_parquet" else
                                  pytest.param(case, marks=pytest.mark.extended) for case in SKIPPED])
def test_on_corrupt_skip_warns_and_counts(world, case) -> None:
    source, warning = SKIPPED[case]
    output = world / f"out_skip_{case}"
    before = hashes(world)
    result = cli(world / source, output, "data.on_corrupt=skip")
    assert result.returncode == 0, result.stderr
    logged = result.stdout + result.stderr  # Hydra's job logging goes to stdout
    assert warning.format(root=world) in logged and "Traceback" not in logged
    assert hashes(world, skip=output) == before
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["read"]["num_skipped_records"] == 1
    clean = json.loads((world / "prepared" / "manifest.json").read_text())
    assert manifest["num_documents"] == clean["num_documents"] - {"bad_jsonl": 0, "truncated": 4, "binary": 0}[source]


def test_preparing_again_over_a_previous_output_is_allowed(world) -> None:
    before = hashes(world, skip=world / "prepared")
    old_manifest = json.loads((world / "prepared" / "manifest.json").read_text())
    result = cli(world / "corpus", world / "prepared", vocab_size=290)
    assert result.returncode == 0, result.stderr
    assert json.loads((world / "prepared" / "manifest.json").read_text())["vocab_size"] == 290 != \
        old_manifest["vocab_size"]
    assert hashes(world, skip=world / "prepared") == before
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []  # no temporary left over
