#!/usr/bin/env bash
# Wall-clock timings of the CLI on the shared library (benchmarks/results/cli.md):
#   bash benchmarks/bench_cli.sh RUNS BASE_MODEL_DIR [EXPERTS_GLOB]
# Per run, in a fresh SPECTR_HOME: a first-ever ingest of the 8 experts (cold: transformers builds the base's
# module table), the same 8 again (unchanged), `spectr catalog`; then another fresh home where the base is
# registered first (`spectr base add`, untimed) and the 8 experts are ingested new. No Prefect server.
set -euo pipefail
runs=${1:-3}; base=${2:?base model folder}; experts=${3:-../shared/experts/*}
spectr=${SPECTR_BIN:-$(dirname "$0")/../.venv/bin/spectr}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
unset PREFECT_API_URL
t() { local label=$1; shift; /usr/bin/time -f "$label %e" "$@" >/dev/null 2>"$tmp/err" || true; tail -1 "$tmp/err"; }
for i in $(seq 1 "$runs"); do
  export SPECTR_HOME=$tmp/home-$i
  t cold-new "$spectr" ingest "$experts" --base-model "$base"
  t unchanged "$spectr" ingest "$experts" --base-model "$base"
  t catalog "$spectr" catalog
  export SPECTR_HOME=$tmp/home-b$i
  "$spectr" base add "$base" >/dev/null
  t new-known-base "$spectr" ingest "$experts" --base-model "$base"
  uptime | sed 's/.*load/load/'
done
