#!/usr/bin/env bash
# guidellm (a standard load tool for OpenAI-compatible servers) against `python -m moe.serve`: a sweep of
# request rates per model name, with time to first token, inter-token latency and throughput.
#
#   bash benchmarks/serve_guidellm.sh SMALL_CKPT LARGE_CKPT ROUTER_JSON [OUT_DIR]
#
# Env: MODELS (default "cascade small large": the routings swept), SECONDS_PER_RATE (20), RATES (6: a sweep of
# synchronous, throughput and 4 constant rates between), PROMPT_TOKENS (64), OUTPUT_TOKENS (32), PORT (8123).
# guidellm goes into its own venv (.venv-guidellm: guidellm 0.3.1, whose CLI this script speaks, without torch);
# its synthetic prompts are tokenized with the large tier's tokenizer (exported with `moe.hf export`). The
# service runs with its defaults (no resource overrides), on the same machine as the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=$1; LARGE=$2; ROUTER=$3; OUT=${4:-runs/guidellm}
MODELS=${MODELS:-cascade small large}; SECONDS_PER_RATE=${SECONDS_PER_RATE:-20}; RATES=${RATES:-6}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}; OUTPUT_TOKENS=${OUTPUT_TOKENS:-32}; PORT=${PORT:-8123}
PY=.venv/bin/python
mkdir -p "$OUT"
if [ ! -x .venv-guidellm/bin/guidellm ]; then
  python3 -m venv .venv-guidellm
  .venv-guidellm/bin/pip install --quiet guidellm==0.3.1
fi
$PY -m moe.hf export "$LARGE" "$OUT/tokenizer_hf" > /dev/null
$PY -m moe.serve small="$SMALL" large="$LARGE" routing.router="$ROUTER" port="$PORT" dashboard_port=$((PORT + 1)) \
  > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf -m 5 "http://127.0.0.1:$PORT/healthz" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
  sleep 2
done
REPORTS=()
for MODEL in $MODELS; do
  HF_HUB_OFFLINE=1 .venv-guidellm/bin/guidellm benchmark --target "http://127.0.0.1:$PORT" --model "$MODEL" \
    --processor "$OUT/tokenizer_hf" --data "prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --rate-type sweep --rate "$RATES" --max-seconds "$SECONDS_PER_RATE" --random-seed 0 \
    --output-path "$OUT/guidellm_$MODEL.json" --disable-progress > "$OUT/guidellm_$MODEL.log" 2>&1
  REPORTS+=("$OUT/guidellm_$MODEL.json")
done
$PY benchmarks/guidellm_report.py "${REPORTS[@]}" --json "$OUT/guidellm_summary.json"
