"""Generation against transformers on the same weights: the project's `Generator` vs `model.generate`.

    python benchmarks/generate_peer.py CHECKPOINT [--batches 1,16,32] [--new-tokens 64] [--prompt-tokens 32]
                                       [--rounds 5] [--threads 2] [--out gpu_or_cpu.json]

CHECKPOINT is a moe checkpoint (with its tokenizer.json); it is exported with
`moe.hf.export_hf` to a temporary Hugging Face Mixtral directory, which
transformers loads (`AutoModelForCausalLM`, float32). Three variants decode the
same prompts greedily for exactly `--new-tokens` tokens (EOS ignored: ours with
`SamplingParams(ignore_eos=True)`, transformers with `min_new_tokens`):
transformers' `generate`, our `Generator` (eager) and our `Generator` with
`compile_decode=True` (each decoding step one compiled graph; prefill eager).
One batch size at a time, the variants taking turns round by round (this
machine is noisy; medians are reported); round 0 warms up (the compiled
variant compiles there, not timed). The greedy tokens must be identical, or the
comparison is refused. Prompts are windows of `--prompt-tokens` tokens of the
checkpoint run's validation split when it has one, else random ids: equal
lengths, so neither side pads.

Prints one table row per batch size and a JSON line (tokens/s of each, each of
ours against transformers). Issue 18's target: >= 1.5x at batch 1 and >= 1.2x
at batch 32 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts_for(checkpoint: Path, count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` tokens: validation windows of the run's data, else random ids."""
    try:
        from cascade.calibrate import data_dir_of, read_split_documents

        documents = read_split_documents(data_dir_of(checkpoint, None), "validation", count, length)
        if len(documents) >= 1:
            windows = [doc[i:i + length] for doc in documents for i in range(0, len(doc) - length + 1, length)]
            if len(windows) >= count:
                return windows[:count]
    except (ImportError, ValueError, FileNotFoundError):
        pass
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


def ours(generator, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    from moe.generate import SamplingParams

    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)] * len(prompts)
    started = time.perf_counter()
    completions = generator.generate_ids(prompts, params)
    return [list(c.token_ids) for c in completions], time.perf_counter() - started


def theirs(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[list[list[int]], float]:
    input_ids = torch.tensor(prompts)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    elapsed = time.perf_counter() - started
    return out[:, input_ids.shape[1]:].tolist(), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import moe
    from moe.generate import Generator, load_tokenizer
    from moe.hf import export_hf

    model = moe.load_checkpoint(args.checkpoint).eval()
    config = model.config
    if args.prompt_tokens + args.new_tokens > config.max_seq_len:
        parser.error(f"--prompt-tokens + --new-tokens exceed the model's max_seq_len ({config.max_seq_len})")
    max_batch = max(map(int, args.batches.split(",")))
    generator = Generator(model, load_tokenizer(args.checkpoint), max_batch_size=max_batch)
    compiled = Generator(model, load_tokenizer(args.checkpoint), max_batch_size=max_batch, compile_decode=True)
    with tempfile.TemporaryDirectory(prefix="generate_peer_") as tmp:
        export_hf(model, Path(tmp) / "hf", tokenizer_file=args.checkpoint / "tokenizer.json")
        peer = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = prompts_for(args.checkpoint, max(batches), args.prompt_tokens, config.vocab_size)
    variants = {"transformers": lambda chosen: theirs(peer, chosen, args.new_tokens, pad_id=0),
                "ours": lambda chosen: ours(generator, chosen, args.new_tokens),
                "ours_compiled": lambda chosen: ours(compiled, chosen, args.new_tokens)}
    rows = []
    for batch in batches:
        chosen = prompts[:batch]
        names = list(variants)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds + 1):  # round 0 warms every variant up (and compiles) and checks
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            results = {}
            for name in order:
                tokens, seconds = variants[name](chosen)
                results[name] = tokens
                if round_index:
                    times[name].append(seconds)
            for name in names[1:]:
                if round_index == 0 and results[name] != results[names[0]]:
                    differing = sum(a != b for a, b in zip(results[name], results[names[0]]))
                    sys.exit(f"error: batch {batch}: {name}'s greedy tokens differ from {names[0]}'s on "
                             f"{differing} of {batch} prompts; a speed comparison would not compare the same work")
        generated = batch * args.new_tokens
        row = {"batch": batch, "new_tokens": args.new_tokens}
        for name in names:
            row[f"{name}_tokens_per_s"] = generated / statistics.median(times[name])
        for name in names[1:]:
            row[f"ratio_{name}"] = row[f"{name}_tokens_per_s"] / row["transformers_tokens_per_s"]
        rows.append(row)
        print(f"batch {batch:>3}: " + ", ".join(f"{name} {row[f'{name}_tokens_per_s']:8.1f} tok/s" for name in names)
              + "; " + ", ".join(f"{name} {row[f'ratio_{name}']:.2f}x" for name in names[1:])
              + f" transformers (median of {args.rounds} rounds, the variants taking turns)", flush=True)
    result = {"checkpoint": str(args.checkpoint), "threads": args.threads, "rounds": args.rounds,
              "prompt_tokens": args.prompt_tokens, "identical_greedy_tokens": True, "rows": rows}
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
