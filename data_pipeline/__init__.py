"""The data pipeline: raw text -> tokenized Arrow shards with difficulty scores -> paced, packed batches.

Stages, one file each:
    source.py      find the corpus files (text, JSONL, Parquet; default: the Python stdlib) and read documents
    tokenize.py    byte-level BPE (`tokenizers`), EOS after every document, `load_tokenizer(data_dir)`
    score.py       difficulty metrics (length, compression, rarity, perplexity) and percentiles
    shards.py      bounded Arrow IPC stream shards: writing, verifying, memory-mapped reading
    manifest.py    `manifest.json`: counts, tokenizer hash, metric statistics, split, record batch index
    engine.py      where tokenization and scoring run: this process or Ray Data
    prepare.py     `prepare(cfg)`, `ensure_prepared(cfg)`, `check_prepared(dir, ...)`, `python -m data_pipeline.prepare`
    curriculum.py  DeepSpeed-style pacing, the document stream and the shuffle buffer
    pack.py        documents -> sequences of seq_len + 1 tokens
    loader.py      `CurriculumLoader`: per-rank batches, prefetch, exact `state_dict()` resumption
    config.py      `DataConfig` / `CurriculumConfig`, the `data` config group's schema
    testing.py     tiny deterministic corpora for tests

Importing the package imports none of them (no torch, Ray or Hydra at import time).
"""
