#!/usr/bin/env bash
# corpus.sh — fetch (once) and cache the real-firmware delta corpus in .cache/corpus/.
#
# Wraps ../shared/corpus/get-corpus.sh (pinned package versions + SHA-256). If every pinned pair
# is already cached and its hashes verify, nothing is fetched, so tests and benchmarks work
# offline once this has succeeded. Env: CORPUS_SCRIPT (path to get-corpus.sh), SKIP_DEBIAN=1.
# usage: scripts/corpus.sh [OUT_DIR]     (default: <repo>/.cache/corpus)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.cache/corpus}
SCRIPT=${CORPUS_SCRIPT:-$ROOT/../shared/corpus/get-corpus.sh}
[ -f "$SCRIPT" ] || SCRIPT=/work/shared/corpus/get-corpus.sh
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then export PYTHON=$ROOT/.venv/bin/python; fi

want=12
[ "${SKIP_DEBIAN:-0}" = 1 ] && want=8
if [ -f "$OUT/SHA256SUMS" ] && [ "$(wc -l < "$OUT/SHA256SUMS")" -ge "$want" ] \
    && (cd "$OUT/pairs" && sha256sum --quiet -c "$OUT/SHA256SUMS"); then
    echo "corpus cached in $OUT/pairs: $(ls "$OUT/pairs" | tr '\n' ' ')"
    exit 0
fi
exec bash "$SCRIPT" "$OUT"
