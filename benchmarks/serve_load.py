"""Cascade serving under a bounded concurrent HTTP load: batched tiers against `max_batch_size=1`, same run.

    python benchmarks/serve_load.py small=runs/mixtral_tiny/checkpoints/step_00000300 \\
        large=runs/mixtral_base/checkpoints/step_00000500 [router=runs/cascade/tiny_base/router.json] \\
        [requests=2000] [concurrency=32] [rounds=3] [prompt_tokens=8-128] [max_tokens=8-64] \\
        [models=cascade] [data=PREPARED_DIR | text=FILE] [seed=0] [timeout_s=600] [out=FILE.json] \\
        [tiers.large.num_replicas=2 ...]

Two applications of the real `serving.app.build_app` run side by side on one
local Ray Serve, composed from conf/serve.yaml as `moe.serve` composes it:
`batched` (the tiers' configured `max_batch_size`, `@serve.batch`) under
/batched and `unbatched` (`max_batch_size=1`, a one-request-at-a-time model
server) under /unbatched. Each burst sends the same `requests` requests to one
application over HTTP on 127.0.0.1 from `concurrency` closed-loop aiohttp
clients: prompts of mixed lengths (a uniform draw from `prompt_tokens`,
windows of the validation documents of the small tier's prepared data, or of
`text=FILE`, decoded with the checkpoint's tokenizer) and a mixed `max_tokens`
(a uniform draw from `max_tokens`), greedy. `models` is a comma list of
`model` fields (`cascade`, the default, routes between both tiers; `small`,
`large`, `cascade@fraction=0.3`, ...). Rounds run the variants round-robin,
starting with a different one each round, and the table reports medians over
rounds: requests/s and generated tokens/s, p50/p99 latency (client-side, end
to end: queueing in the server included) over all requests and per answering
tier (`routed_to`), the share routed to large, and errors (any answer but 200,
summed over rounds). Keys with a dot (`tiers.*`, `routing.*`) are overrides of
conf/serve.yaml for both variants.

Prints a table and a JSON line; `out=FILE` also writes the JSON with every
request's record. Exits 1 when any request failed.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402  (a dependency of ray[default])
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from serving.app import check_tiers, router_file_for  # noqa: E402
from serving.config import register_configs, validate_serve_config  # noqa: E402

VARIANTS = ("batched", "unbatched")
TIERS = ("small", "large")
# Both variants' four tier replicas share the machine; a tier replica uses one torch thread either way.
DEFAULT_TIER_OVERRIDES = ["tiers.small.num_cpus=0.5", "tiers.large.num_cpus=0.5"]


@dataclass
class Options:
    small: str
    large: str
    router: Optional[str] = None
    requests: int = 2000
    concurrency: int = 32
    rounds: int = 3
    prompt_tokens: tuple[int, int] = (8, 128)
    max_tokens: tuple[int, int] = (8, 64)
    models: tuple[str, ...] = ("cascade",)
    data: Optional[str] = None
    text: Optional[str] = None
    seed: int = 0
    timeout_s: float = 600.0
    out: Optional[str] = None
    serve_overrides: list[str] = field(default_factory=list)


def _span(key: str, value: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    try:
        span = (int(low), int(high or low))
    except ValueError:
        raise SystemExit(f"error: {key}: expected N or LOW-HIGH, got {value!r}") from None
    if not 1 <= span[0] <= span[1]:
        raise SystemExit(f"error: {key}: expected 1 <= LOW <= HIGH, got {value!r}")
    return span


def parse(argv: list[str]) -> Options:
    values: dict[str, str] = {}
    overrides: list[str] = []
    known = {"small", "large", "router", "requests", "concurrency", "rounds", "prompt_tokens", "max_tokens",
             "models", "data", "text", "seed", "timeout_s", "out"}
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.split(".")[0] in ("tiers", "routing") and "." in key:
            overrides.append(item)
        elif sep and key in known:
            values[key] = value
        else:
            raise SystemExit(f"error: expected key=value with key in {', '.join(sorted(known))}, or a "
                             f"tiers.*/routing.* override of conf/serve.yaml; got {item!r}")
    if "small" not in values or "large" not in values:
        raise SystemExit("error: small=CKPT and large=CKPT are required")
    if "data" in values and "text" in values:
        raise SystemExit("error: give data=DIR or text=FILE, not both")
    options = Options(small=values["small"], large=values["large"], router=values.get("router") or None,
                      data=values.get("data"), text=values.get("text"), out=values.get("out"),
                      serve_overrides=overrides)
    for key in ("requests", "concurrency", "rounds", "seed"):
        if key in values:
            try:
                setattr(options, key, int(values[key]))
            except ValueError:
                raise SystemExit(f"error: {key}: expected an integer, got {values[key]!r}") from None
            if key != "seed" and getattr(options, key) < 1:
                raise SystemExit(f"error: {key}: must be >= 1, got {values[key]}")
    for key in ("prompt_tokens", "max_tokens"):
        if key in values:
            setattr(options, key, _span(key, values[key]))
    if "models" in values:
        options.models = tuple(m for m in values["models"].split(",") if m)
    if "timeout_s" in values:
        options.timeout_s = float(values["timeout_s"])
    return options


# ---- the service -----------------------------------------------------------------------------

def serve_config(options: Options, *variant_overrides: str) -> DictConfig:
    """conf/serve.yaml as `moe.serve` composes it, with the benchmark's and the variant's overrides."""
    overrides = [f"small={options.small}", f"large={options.large}", *DEFAULT_TIER_OVERRIDES,
                 *options.serve_overrides, *variant_overrides]
    if options.router:
        overrides.append(f"routing.router={options.router}")
    if options.max_tokens[1] > 256:  # the default routing.max_tokens_limit
        overrides.append(f"routing.max_tokens_limit={options.max_tokens[1]}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=overrides)
    validate_serve_config(cfg)
    return cfg


def variant_configs(options: Options) -> dict[str, DictConfig]:
    unbatched = [f"tiers.{tier}.max_batch_size=1" for tier in TIERS]
    return {"batched": serve_config(options), "unbatched": serve_config(options, *unbatched)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cpus(configs: dict[str, DictConfig]) -> int:
    """Logical CPUs for every replica of every variant (the ingresses take 0.1 each)."""
    needed = 0.0
    for cfg in configs.values():
        for tier in TIERS:
            t = cfg.tiers[tier]
            needed += t.num_cpus * (t.autoscaling.max_replicas if t.autoscaling.enabled else t.num_replicas)
        needed += 0.1
    return max(os.cpu_count() or 1, math.ceil(needed))


def deploy(configs: dict[str, DictConfig], facts: dict[str, Any], router: Path) -> str:
    """Starts a local Ray and Serve on 127.0.0.1 and runs each variant under /VARIANT; returns the URL."""
    import ray
    from ray import serve

    from serving.app import build_app

    port = free_port()
    ray.init(num_cpus=ray_cpus(configs), include_dashboard=False, log_to_driver=False,
             _metrics_export_port=free_port())
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for variant, cfg in configs.items():
        serve.run(build_app(cfg, facts, router), name=variant, route_prefix=f"/{variant}")
    return f"http://127.0.0.1:{port}"


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


# ---- the requests ------------------------------------------------------------------------------

def load_tokenizer(checkpoint: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as the ingress counts a prompt's tokens
    return tokenizer


def source_documents(options: Options, tokenizer: Any) -> tuple[list[list[int]], str]:
    """Token documents to cut prompts from, and where they came from."""
    if options.text:
        text = Path(options.text).read_text(errors="replace")[:4_000_000]
        return [tokenizer.encode(text).ids], options.text
    from cascade.calibrate import data_dir_of, read_split_documents

    try:
        data_dir = data_dir_of(Path(options.small), options.data)
    except ValueError as err:
        raise SystemExit(f"error: {err} (or text=FILE)") from None
    documents = read_split_documents(data_dir, "validation", limit=10_000, min_tokens=options.prompt_tokens[0])
    return documents, f"{data_dir} (validation split)"


def make_requests(options: Options, documents: list[list[int]], tokenizer: Any,
                  max_seq_len: int) -> list[dict[str, Any]]:
    """`requests` (prompt, max_tokens) pairs: a window of a random document, of a random length in `prompt_tokens`.

    A window is decoded to text and the text encoded again, as the ingress will; a prompt whose tokens plus its
    max_tokens exceed the tiers' context is drawn again.
    """
    if options.prompt_tokens[1] + options.max_tokens[1] > max_seq_len:
        raise SystemExit(f"error: prompt_tokens {options.prompt_tokens[1]} + max_tokens {options.max_tokens[1]} "
                         f"exceed the tiers' context of {max_seq_len} tokens")
    documents = sorted((d for d in documents if len(d) >= options.prompt_tokens[0]), key=len)
    lengths = [len(d) for d in documents]
    if not documents or lengths[-1] < options.prompt_tokens[1]:
        raise SystemExit(f"error: no prompt source document has {options.prompt_tokens[1]} tokens (longest: "
                         f"{lengths[-1] if lengths else 0}); lower prompt_tokens or pass text=FILE")
    rng = random.Random(options.seed)
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < options.requests:
        attempts += 1
        if attempts > 20 * options.requests + 100:
            raise SystemExit("error: too few prompts fit the context after decoding; lower prompt_tokens")
        length = rng.randint(*options.prompt_tokens)
        document = documents[rng.randrange(bisect_left(lengths, length), len(documents))]
        start = rng.randrange(len(document) - length + 1)
        prompt = tokenizer.decode(document[start:start + length])
        max_tokens = rng.randint(*options.max_tokens)
        num_tokens = len(tokenizer.encode(prompt).ids)
        if 0 < num_tokens and num_tokens + max_tokens <= max_seq_len and prompt.strip():
            out.append({"prompt": prompt, "max_tokens": max_tokens})
    return out


# ---- the load ------------------------------------------------------------------------------------

async def _send(session: aiohttp.ClientSession, url: str, model: str, request: dict[str, Any],
                timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {"status": None, "tier": None, "tokens": 0, "degraded": False}
    try:
        async with session.post(url, json={"model": model, "prompt": request["prompt"], "temperature": 0,
                                           "max_tokens": request["max_tokens"]}, timeout=timeout) as response:
            text = await response.text()
            record["status"] = response.status
            if response.status == 200:
                body = json.loads(text)
                record.update(tier=body["routed_to"], tokens=body["usage"]["completion_tokens"],
                              degraded=bool(body.get("degraded")))
            else:
                record["error"] = text[:300]
    # Any failure of one request (connection, time-out, a malformed body) is that request's error, not the run's.
    except Exception as err:  # noqa: BLE001
        record.update(status=type(err).__name__, error=str(err)[:300])
    record["latency_s"] = time.perf_counter() - started
    return record


async def burst(url: str, model: str, requests: list[dict[str, Any]], concurrency: int,
                timeout_s: float) -> tuple[list[dict[str, Any]], float]:
    """Sends every request from `concurrency` closed-loop clients; returns (records in request order, wall s)."""
    records: list[Optional[dict[str, Any]]] = [None] * len(requests)
    indices = iter(range(len(requests)))
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def client(session: aiohttp.ClientSession) -> None:
        for index in indices:  # one shared iterator: each client takes the next request when it is free
            records[index] = await _send(session, f"{url}/v1/completions", model, requests[index], timeout)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return [r for r in records if r is not None], wall


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One burst: throughput of the answered requests, latencies overall and per answering tier, errors."""
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    summary: dict[str, Any] = {
        "errors": len(records) - len(ok), "degraded": sum(r["degraded"] for r in ok),
        "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "p50_s": percentile(latencies, 0.50), "p99_s": percentile(latencies, 0.99),
        "large_share": sum(r["tier"] == "large" for r in ok) / len(ok) if ok else None}
    for tier in TIERS:
        tier_latencies = [r["latency_s"] for r in ok if r["tier"] == tier]
        summary[f"{tier}_p50_s"] = percentile(tier_latencies, 0.50)
        summary[f"{tier}_p99_s"] = percentile(tier_latencies, 0.99)
    return summary


def median_row(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds (of the rounds where the value exists); errors and degraded answers summed."""
    row: dict[str, Any] = {}
    for key in bursts[0]:
        values = [b[key] for b in bursts if b[key] is not None]
        if key in ("errors", "degraded"):
            row[key] = sum(values)
        else:
            row[key] = statistics.median(values) if values else None
    return row


def run_rounds(url: str, options: Options, requests: list[dict[str, Any]]) -> tuple[dict, list]:
    """Every round: each model, the variants in turn (a different one first each round)."""
    bursts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    records: list[dict[str, Any]] = []
    for r in range(options.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for model in options.models:
            for variant in order:
                results, wall = asyncio.run(burst(f"{url}/{variant}", model, requests, options.concurrency,
                                                  options.timeout_s))
                summary = summarize(results, wall)
                bursts.setdefault((model, variant), []).append(summary)
                records += [{"round": r, "model": model, "variant": variant, "request": i, **rec}
                            for i, rec in enumerate(results)]
                print(f"[serve_load] round {r + 1}/{options.rounds} {model} {variant}: {len(results)} requests in "
                      f"{wall:.1f} s, {summary['tokens_per_s']:.1f} tokens/s, {summary['errors']} errors",
                      file=sys.stderr, flush=True)
    return bursts, records


def warm_up(url: str, options: Options, requests: list[dict[str, Any]]) -> None:
    """First calls pay for lazy initialisation; a failure here stops the run before any measurement."""
    few = [{**r, "max_tokens": min(4, r["max_tokens"])} for r in requests[:options.concurrency]]
    for variant in VARIANTS:
        for model in options.models:
            results, _ = asyncio.run(burst(f"{url}/{variant}", model, few, options.concurrency, options.timeout_s))
            failed = [r for r in results if r["status"] != 200]
            if failed:
                raise SystemExit(f"error: warm-up of {variant} ({model}) failed: {len(failed)} of {len(results)} "
                                   f"requests, first: {failed[0]['status']} {failed[0].get('error', '')}")


# ---- the report ------------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str) -> str:
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0] or 0))


def report(options: Options, rows: list[dict[str, Any]], ratios: dict[str, dict[str, float]]) -> None:
    lo, hi = options.prompt_tokens
    mlo, mhi = options.max_tokens
    print(f"\n{options.requests} requests per burst x {options.rounds} rounds, concurrency {options.concurrency}, "
          f"prompts {lo}-{hi} tokens, max_tokens {mlo}-{mhi}, greedy; medians over rounds, errors summed")
    print(f"{'model':10} {'variant':10} {'batch':>5} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'small p50':>9} {'small p99':>9} {'large p50':>9} {'large p99':>9} {'large':>6} {'errors':>6}")
    for row in rows:
        print(f"{row['model']:10} {row['variant']:10} {row['max_batch_size']:>5} {row['requests_per_s']:7.2f} "
              f"{row['tokens_per_s']:8.1f} {_fmt(row['p50_s'], '7.2f')} {_fmt(row['p99_s'], '7.2f')} "
              f"{_fmt(row['small_p50_s'], '9.2f')} {_fmt(row['small_p99_s'], '9.2f')} "
              f"{_fmt(row['large_p50_s'], '9.2f')} {_fmt(row['large_p99_s'], '9.2f')} "
              f"{_fmt(row['large_share'], '6.2f')} {row['errors']:>6}")
    print("batched / unbatched: " + ", ".join(
        f"{model} {_fmt(r['requests_per_s'], '.2f')}x requests/s, {_fmt(r['tokens_per_s'], '.2f')}x tokens/s"
        for model, r in ratios.items()))


def report_failures(records: list[dict[str, Any]]) -> None:
    failed = [r for r in records if r["status"] != 200]
    degraded = sum(r["degraded"] for r in records)
    if degraded:
        print(f"WARNING: {degraded} answers were degraded (the chosen tier failed or timed out; the other tier "
              f"answered, counted under routed_to)", file=sys.stderr)
    if failed:
        statuses = Counter(str(r["status"]) for r in failed)
        print(f"\nERROR: {len(failed)} of {len(records)} requests failed (status: count) {dict(statuses)}; first: "
              f"{failed[0]['variant']} {failed[0]['model']}: {failed[0]['status']} {failed[0].get('error', '')}",
              file=sys.stderr)


def main() -> int:
    options = parse(sys.argv[1:])
    register_configs()
    try:  # everything that can be checked is checked before Ray starts, as moe.serve does
        configs = variant_configs(options)
        facts = check_tiers(options.small, options.large)
        router = router_file_for(configs["batched"], facts)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    tokenizer = load_tokenizer(options.small)
    documents, source = source_documents(options, tokenizer)
    requests = make_requests(options, documents, tokenizer, min(facts[tier]["max_seq_len"] for tier in TIERS))
    try:
        url = deploy(configs, facts, router)
        warm_up(url, options, requests)
        bursts, records = run_rounds(url, options, requests)
    finally:
        shutdown()

    batch_sizes = {variant: configs[variant].tiers.small.max_batch_size for variant in VARIANTS}
    if configs["batched"].tiers.large.max_batch_size != batch_sizes["batched"]:
        batch_sizes["batched"] = (f"{batch_sizes['batched']}/"
                                  f"{configs['batched'].tiers.large.max_batch_size}")  # small/large
    rows = [{"model": model, "variant": variant, "max_batch_size": batch_sizes[variant],
             "requests": options.requests, **median_row(b)} for (model, variant), b in bursts.items()]
    by_key = {(row["model"], row["variant"]): row for row in rows}
    ratios = {model: {key: by_key[model, "batched"][key] / by_key[model, "unbatched"][key]
                      if by_key[model, "unbatched"][key] else None
                      for key in ("requests_per_s", "tokens_per_s")} for model in options.models}
    report(options, rows, ratios)
    errors = sum(row["errors"] for row in rows)
    result = {"benchmark": "serve_load", "requests": options.requests, "concurrency": options.concurrency,
              "rounds": options.rounds, "prompt_tokens": list(options.prompt_tokens),
              "max_tokens": list(options.max_tokens), "models": list(options.models), "seed": options.seed,
              "prompt_source": source, "router": str(router), "serve_overrides": options.serve_overrides,
              "rows": rows, "batched_over_unbatched": ratios, "errors": errors}
    print(json.dumps(result))
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps({**result, "records": records}) + "\n")
    report_failures(records)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
