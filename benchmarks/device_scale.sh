#!/usr/bin/env bash
# Issue 13's 16-core measurement: 1,000 generated SmolLM2-shaped rank-8 adapters through Prefect's Dask task
# runner with 8 workers, against 1 and 2 workers (bench_scale.py ingest), on the GPU host (16 cores, no
# internet, no prefect/dask/sqlalchemy/alembic installed there).
#
# Here, on a machine with PyPI (fills DIR with the wheels, this checkout's spectr wheel and bench_scale.py):
#     bash benchmarks/device_scale.sh prepare /work/main/.device-scale
# There, from the repo root, with DIR carried (results go to $OUT: JSON, markdown, logs):
#     bash .device-scale/run.sh          # = bash .device-scale/device_scale.sh run .device-scale
# The device copies the session's own checkout, not a helper's worktree: from a worktree, copy DIR into an
# ignored folder of that checkout (e.g. /work/main/.device-wt13/.device-scale) and carry that folder.
#
# Sized for about 5 minutes of wall time on 16 cores (~0.25 s of one core per adapter and worker):
#   1. 8 workers on 1,000 adapters, alone on the machine (the adapters are generated first, off the clock);
#   2. then side by side, each pinned to cores of its own with taskset (driver, Prefect server and workers
#      of a run share its cores): 1 worker on 1,000 (cores 2-5), 2 workers on 1,000 (cores 6-11), and the
#      2-core box emulated: 2 workers on 1,000 with the whole run on cores 0-1.
# Every run has a time limit (RUN_LIMIT s, default 330); the merged table is printed at the end.
set -euo pipefail

mode=${1:?usage: device_scale.sh prepare|run DIR}
dir=$(cd "${2:?usage: device_scale.sh prepare|run DIR}" 2>/dev/null && pwd || echo "$2")

if [ "$mode" = prepare ]; then
    repo=$(cd "$(dirname "$0")/.." && pwd)
    py=${PYTHON:-$repo/.venv/bin/python}
    mkdir -p "$dir/wheels" "$dir/stack"
    rm -f "$dir"/wheels/*.whl "$dir"/stack/*.whl
    # The closure of what the host lacks, for its Python 3.12 on x86-64 (pip matches each manylinux tag exactly).
    plats=()
    for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 \
             manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
             manylinux_2_35_x86_64; do plats+=(--platform "$p"); done
    pyver=${PYVER:-3.12}  # the host's Python
    "$py" -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" \
        "${plats[@]}" -d "$dir/wheels" 'prefect==3.9.1' 'prefect-dask==0.3.7' 'dask==2026.8.0' \
        'distributed==2026.8.0' 'sqlalchemy==2.1.9' 'alembic==1.20.1'
    # Packages the host's torch/transformers stack already has: kept apart, installed only if the import
    # check there fails without them (so the host's own versions are not shadowed without need).
    for name in certifi charset_normalizer fsspec idna jinja2 markupsafe packaging psutil python_dateutil \
                pyyaml regex requests six typing_extensions urllib3 zipp; do
        for w in "$dir"/wheels/*.whl; do
            base=$(basename "$w" | tr 'A-Z' 'a-z')
            case "$base" in "$name"-*) mv "$w" "$dir/stack/" ;; esac
        done
    done
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir/wheels" "$repo"
    cp "$repo/benchmarks/bench_scale.py" "$repo/benchmarks/device_scale.sh" "$dir/"
    printf '#!/usr/bin/env bash\nexec bash "$(dirname "$0")/device_scale.sh" run "$(dirname "$0")"\n' > "$dir/run.sh"
    du -sh "$dir"
    exit 0
fi

[ "$mode" = run ] || { echo "device_scale.sh: mode must be prepare or run, got $mode" >&2; exit 2; }
start=$(date +%s)
out=${OUT:-$dir/out}
mkdir -p "$out"
site=${SITE:-/tmp/spectr-site}
root=${SCALE_ROOT:-/tmp/spectr-scale}
export PREFECT_HOME=/tmp/spectr-prefect PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
       SPECTR_HOME=/tmp/spectr-home PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # a dry run elsewhere: PYTHON=.venv/bin/python NO_INSTALL=1 ADAPTERS=16
install() { "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"; }
[ -n "${NO_INSTALL:-}" ] || install "$dir"/wheels/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
# Away from the checkout: its own spectr/ folder must not shadow the installed package.
check() { (cd /tmp && "$py" -c 'import prefect, prefect_dask, distributed, sqlalchemy, alembic, psutil, torch, transformers
from prefect.testing.utilities import prefect_test_harness
import spectr.flows.ingest, spectr.pipeline.ingest, spectr.registry.store
print("imports ok: prefect", prefect.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'); }
if ! check 2>"$out/import_check.txt"; then
    echo "imports failed without the stack wheels (see import_check.txt); installing them too"
    install "$dir"/stack/*.whl
    check
fi
{ echo "install + import check: $(( $(date +%s) - start )) s"; nproc; grep -m1 'model name' /proc/cpuinfo; free -g | head -2
  df -h /tmp | tail -1; uptime; } | tee "$out/host.txt"
limit=${RUN_LIMIT:-330}
n=${ADAPTERS:-1000}
cd /tmp
bench=("$py" "$dir/bench_scale.py" ingest --adapters "$n" --no-in-process --root "$root")
echo "== 8 workers, alone"
timeout "$limit" "${bench[@]}" --gen-procs "$(nproc)" --workers 8 --out "$out/w8.json" 2>"$out/w8.err" \
    | tee "$out/w8.log" || echo "8 workers: exit $?"
echo "== side by side, pinned: 1 worker (cores 2-5), 2 workers (6-11), 2-core emulation (0-1)"
taskset -c 2-5 timeout "$limit" "${bench[@]}" --workers 1 --out "$out/w1.json" 2>"$out/w1.err" >"$out/w1.log" &
taskset -c 6-11 timeout "$limit" "${bench[@]}" --workers 2 --out "$out/w2.json" 2>"$out/w2.err" >"$out/w2.log" &
taskset -c 0,1 timeout "$limit" "${bench[@]}" --workers 2 --label=-2core --out "$out/w2core.json" \
    2>"$out/w2core.err" >"$out/w2core.log" &
wait || true
for f in w1 w2 w2core; do echo "-- $f"; tail -n 2 "$out/$f.log" || true; done
results=()
for f in w8 w1 w2 w2core; do [ -s "$out/$f.json" ] && results+=("$out/$f.json"); done
"$py" "$dir/bench_scale.py" combine "${results[@]}" --out "$out/scale_ingest_16core.json" --md "$out/scale_ingest_16core.md"
rm -rf "$root"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/host.txt"
