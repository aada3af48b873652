#!/usr/bin/env bash
# Issue 13's 16-core measurement: 1,000 generated SmolLM2-shaped rank-8 adapters through Prefect's Dask task
# runner with 8 workers against 1 worker (bench_scale.py ingest), on the GPU host (16 cores, no internet, no
# prefect/dask/sqlalchemy/alembic installed there).
#
# Here, on a machine with PyPI (fills DIR with the wheels, this checkout's spectr wheel and bench_scale.py):
#     bash benchmarks/device_scale.sh prepare /work/main/.device-scale
# There, from the repo root, with DIR carried (results go to $OUT: JSON, markdown, logs):
#     bash .device-scale/run.sh          # = bash .device-scale/device_scale.sh run .device-scale
# The device copies the session's own checkout, not a helper's worktree: run `prepare` from the worktree
# (the wheel is built from the checkout the script sits in) into an ignored folder of the session's
# checkout, and carry that folder.
#
# Each run has the whole machine, one after the other, and each is its own process with its own Prefect
# server (both pay the same first-flow-run costs a `spectr ingest --workers N` pays): the installed packages
# are byte-compiled first (as a plain pip install leaves them; the wheels go in with --no-compile, and
# processes importing uncompiled Prefect at once paid for it on the clock before), the adapters are
# generated, then
#   1. 8 workers on 1,000 adapters;
#   2. 1 worker on 1,000 adapters;
#   3. 2 workers on 1,000 adapters, only when TWO=1 (about 2 minutes more).
# Every run has a time limit (RUN_LIMIT s, default 300); the table with the speed-ups and the start-up
# phases is printed at the end (~300 s in all on 16 cores: 312 s with GROW_GIB=20).
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
py=${PYTHON:-python3}  # a dry run elsewhere: PYTHON=.venv/bin/python NO_INSTALL=1 ADAPTERS=16 WORKERS="2 1"
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
[ -n "${NO_INSTALL:-}" ] || "$py" -m compileall -q -j 0 "$site" >/dev/null || echo "byte-compiling $site: exit $?"
{ echo "install + byte-compile + import check: $(( $(date +%s) - start )) s"; nproc; grep -m1 'model name' /proc/cpuinfo
  lscpu 2>/dev/null | grep -E '^(Thread|Core|Socket|NUMA node\(s\)|CPU max MHz|CPU MHz)' || true
  free -g | head -2; df -h /tmp | tail -1; uptime; } | tee "$out/host.txt"
limit=${RUN_LIMIT:-300}
n=${ADAPTERS:-1000}
cd /tmp
"$py" "$dir/bench_scale.py" generate --adapters "$n" --root "$root" --procs "$(nproc)" | tee -a "$out/host.txt"
# Some hosts are VMs whose memory grows as it is used (KINDS.md: ~3 s per 8 GiB): a run writing ~15 GB of
# blobs into the page cache fast would wait for that growth, and only the first run would. GROW_GIB=20
# touches and frees that much once first, so every run starts from the same memory (the 1-GPU H200 kind had
# its 125.8 GiB from the start, so not by default); MemTotal is logged around the runs either way.
memtotal() { echo "MemTotal $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) ($1)"; }
memtotal "at the start" | tee -a "$out/host.txt"
if [ "${GROW_GIB:-0}" -gt 0 ]; then
    "$py" -c 'import sys, time; t = time.time(); held = [bytearray(1 << 30) for _ in range(int(sys.argv[1]))]
print(f"touched {len(held)} GiB in {time.time() - t:.1f} s")' "$GROW_GIB" 2>&1 | tee -a "$out/host.txt" || true
    memtotal "after growing" | tee -a "$out/host.txt"
fi
bench=("$py" "$dir/bench_scale.py" ingest --adapters "$n" --no-in-process --root "$root")
read -r -a runs <<<"${WORKERS:-8 1}"  # a dry run elsewhere: WORKERS="2 1"
[ -z "${TWO:-}" ] || runs+=(2)
results=()
for w in "${runs[@]}"; do
    echo "== $w worker(s), alone on the machine ($(( $(date +%s) - start )) s in)"
    timeout "$limit" "${bench[@]}" --workers "$w" --out "$out/w$w.json" 2>"$out/w$w.err" || echo "$w worker(s): exit $?"
    [ -s "$out/w$w.json" ] && results+=("$out/w$w.json")
    memtotal "after $w worker(s)" | tee -a "$out/host.txt"
    sleep 1  # the run's Prefect server and workers are gone before the next starts
done
"$py" "$dir/bench_scale.py" combine "${results[@]}" --out "$out/scale_ingest_16core.json" --md "$out/scale_ingest_16core.md"
rm -rf "$root"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/host.txt"
