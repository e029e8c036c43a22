#!/usr/bin/env bash
# The main job: quantize the bundled SmolLM2-135M, then report its perplexity next to full precision.
#   METHOD=squeezellm BITS=3 WINDOWS=8 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${METHOD:-rtn}
BITS=${BITS:-4}
GROUP=${GROUP:-64}
WINDOWS=${WINDOWS:-4}
OUT=${OUT:-out/smollm2-$METHOD-$BITS}
DATA=${DATA:-../shared/data}
EXTRA=()
[ "$METHOD" != rtn ] && EXTRA+=(--calib "$DATA/wikitext-2/wiki.valid.tokens" --nsamples 16 --calib-seqlen 512)
[ "$METHOD" != squeezellm ] && EXTRA+=(--group-size "$GROUP")
sqllm quantize smollm2-135m --method "$METHOD" --bits "$BITS" "${EXTRA[@]}" --output "$OUT" --overwrite
sqllm eval "$OUT" --baseline smollm2-135m --ppl "$DATA/wikitext-2-raw/wiki.test.raw" --windows "$WINDOWS" \
  --json "$OUT/eval.json"
