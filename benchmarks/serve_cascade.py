"""Cascade serving under concurrent load: batched tiers (`@serve.batch`) against unbatched ones, same run.

    python benchmarks/serve_cascade.py small=runs/mixtral_tiny/checkpoints/step_00000300 \\
        large=runs/mixtral_base/checkpoints/step_00000500 [router=runs/cascade/.../router.json] \\
        [clients=8] [requests=48] [rounds=3] [max_tokens=32]

Two applications run on one local Ray Serve: the cascade as deployed by
`moe.serve` (tiers batch up to 8 concurrent requests) and the same cascade with
`max_batch_size=1`, the baseline a user gets from a plain one-request-at-a-time
model server. Each round sends the same prompts (the beginnings of validation
documents of the small tier's prepared data) from `clients` threads over real
HTTP to each application, for the models `small`, `large` and `cascade`;
variants alternate order round by round and the table reports medians over
rounds. Prints a table and a JSON line.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import requests  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from ray import serve  # noqa: E402

from serving.app import build_app, check_tiers, router_file_for  # noqa: E402
from serving.config import register_configs  # noqa: E402

VARIANTS = {"batched": 8, "unbatched": 1}
MODELS = ("small", "large", "cascade")


def parse(argv: list[str]) -> dict[str, str]:
    args = {"clients": "8", "requests": "48", "rounds": "3", "max_tokens": "32", "router": ""}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in {*args, "small", "large"}:
            raise SystemExit(f"error: expected key=value with key in small, large, {', '.join(args)}; got {item!r}")
        args[key] = value
    if "small" not in args or "large" not in args:
        raise SystemExit("error: small=CKPT and large=CKPT are required")
    return args


def prompts_from(checkpoint: str, count: int, prompt_tokens: int = 32) -> list[str]:
    from moe.calibrate import data_dir_of, read_validation_documents
    from moe.generate import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    documents = read_validation_documents(data_dir_of(Path(checkpoint), None), limit=10_000,
                                          min_tokens=prompt_tokens)
    windows = [doc[start:start + prompt_tokens] for doc in documents
               for start in range(0, len(doc) - prompt_tokens, 4 * prompt_tokens)]
    return [tokenizer.decode(w) for w in windows[:count]]


def load(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    def one(prompt: str) -> tuple[float, int, str]:
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/completions", timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        response.raise_for_status()
        body = response.json()
        return time.perf_counter() - started, body["usage"]["completion_tokens"], body["routed_to"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {"requests_per_s": len(results) / wall, "tokens_per_s": sum(r[1] for r in results) / wall,
            "p50_s": latencies[len(latencies) // 2], "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "large_share": sum(r[2] == "large" for r in results) / len(results)}


def main() -> None:
    args = parse(sys.argv[1:])
    register_configs()
    clients, rounds, max_tokens = int(args["clients"]), int(args["rounds"]), int(args["max_tokens"])
    prompts = prompts_from(args["small"], int(args["requests"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    router = None
    for variant, batch in VARIANTS.items():
        overrides = [f"small={args['small']}", f"large={args['large']}", "tiers.small.num_cpus=0.5",
                     "tiers.large.num_cpus=0.5", f"tiers.small.max_batch_size={batch}",
                     f"tiers.large.max_batch_size={batch}", f"routing.max_tokens_limit={max(256, max_tokens)}"]
        if args["router"]:
            overrides.append(f"routing.router={args['router']}")
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="serve", overrides=overrides)
        facts = check_tiers(cfg.small, cfg.large)
        router = router or router_file_for(cfg, facts)
        serve.run(build_app(cfg, facts, router), name=variant, route_prefix=f"/{variant}")
    base = f"http://127.0.0.1:{port}"
    for variant in VARIANTS:  # warm-up: first calls pay for lazy initialisation
        load(f"{base}/{variant}", "cascade", prompts[:clients], clients, 4)

    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for model in MODELS:
            for variant in order:
                samples.setdefault((model, variant), []).append(
                    load(f"{base}/{variant}", model, prompts, clients, max_tokens))
    serve.shutdown()
    ray.shutdown()

    rows = []
    for (model, variant), runs in samples.items():
        rows.append({"model": model, "variant": variant,
                     **{k: statistics.median(run[k] for run in runs) for k in runs[0]}})
    print(f"\n{len(prompts)} requests x {rounds} rounds, {clients} concurrent clients, max_tokens={max_tokens}, "
          f"greedy; medians over rounds")
    print(f"{'model':8} {'variant':10} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'large':>6}")
    for row in rows:
        print(f"{row['model']:8} {row['variant']:10} {row['requests_per_s']:7.2f} {row['tokens_per_s']:8.1f} "
              f"{row['p50_s']:7.2f} {row['p95_s']:7.2f} {row['large_share']:6.2f}")
    speedups = {model: next(r["tokens_per_s"] for r in rows if r["model"] == model and r["variant"] == "batched") /
                next(r["tokens_per_s"] for r in rows if r["model"] == model and r["variant"] == "unbatched")
                for model in MODELS}
    print("batched / unbatched tokens/s: " + ", ".join(f"{m} {v:.2f}x" for m, v in speedups.items()))
    print(json.dumps({"benchmark": "serve_cascade", "clients": clients, "requests": len(prompts), "rounds": rounds,
                      "max_tokens": max_tokens, "rows": rows, "speedup_tokens_per_s": speedups,
                      "router": str(router)}))


if __name__ == "__main__":
    main()
