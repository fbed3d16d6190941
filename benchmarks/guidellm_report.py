"""The table and JSON of guidellm benchmark reports (`benchmarks/serve_guidellm.sh` writes them).

    python benchmarks/guidellm_report.py OUT/guidellm_cascade.json OUT/guidellm_small.json ... [--json OUT.json]

One row per benchmark of each report (a sweep: synchronous, throughput, then
constant rates in between): the rate asked and achieved, the mean concurrency,
time to first token and inter-token latency (median and p99 of the successful
requests), output tokens per second, and the requests that completed, errored
or were cut off by the time limit. Reads guidellm 0.3's report format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(report: dict, model: str) -> list[dict]:
    out = []
    for bench in report["benchmarks"]:
        metrics, strategy = bench["metrics"], bench["args"]["strategy"]

        def stat(name: str, key: str = "median") -> float:
            ok = metrics[name]["successful"]
            return ok["percentiles"]["p99"] if key == "p99" else ok[key]

        out.append({"model": model, "strategy": strategy["type_"], "rate_asked": strategy.get("rate"),
                    "req_per_s": stat("requests_per_second", "mean"),
                    "concurrency": stat("request_concurrency", "mean"),
                    "ttft_ms_median": stat("time_to_first_token_ms"),
                    "ttft_ms_p99": stat("time_to_first_token_ms", "p99"),
                    "itl_ms_median": stat("inter_token_latency_ms"),
                    "itl_ms_p99": stat("inter_token_latency_ms", "p99"),
                    "output_tok_per_s": stat("output_tokens_per_second", "mean"),
                    "completed": bench["request_totals"]["successful"], "errored": bench["request_totals"]["errored"],
                    "incomplete": bench["request_totals"]["incomplete"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="guidellm_<model>.json files")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = parser.parse_args()
    table = []
    for path in args.reports:
        table += rows(json.loads(path.read_text()), path.stem.removeprefix("guidellm_"))
    header = (f"{'model':<16} {'strategy':<12} {'asked':>6} {'req/s':>6} {'conc':>5} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8} {'out tok/s':>9} {'ok':>5} {'err':>4} {'cut':>4}")
    print(header)
    print("-" * len(header))
    for r in table:
        asked = f"{r['rate_asked']:.2f}" if r["rate_asked"] else "-"
        print(f"{r['model']:<16} {r['strategy']:<12} {asked:>6} {r['req_per_s']:>6.2f} {r['concurrency']:>5.1f} "
              f"{r['ttft_ms_median']:>9.1f} {r['ttft_ms_p99']:>9.1f} {r['itl_ms_median']:>8.1f} "
              f"{r['itl_ms_p99']:>8.1f} {r['output_tok_per_s']:>9.1f} {r['completed']:>5} {r['errored']:>4} "
              f"{r['incomplete']:>4}")
    print(json.dumps({"guidellm": table}))
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
