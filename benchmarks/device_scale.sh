#!/usr/bin/env bash
# Issue 13's 16-core measurement: 1,000 generated SmolLM2-shaped rank-8 adapters through Prefect's Dask task
# runner with 8 workers against 1 worker (bench_scale.py ingest), on the GPU host (16 cores, no internet, no
# prefect/dask/sqlalchemy/alembic installed there).
#
# Here, on a machine with PyPI (fills DIR with the wheels, this checkout's spectr wheel and bench_scale.py):
#     bash benchmarks/device_scale.sh prepare /work/main/.device-scale
# There, from the repo root, with DIR carried (results go to $OUT: JSON, markdown, logs):
#     bash .device-scale/run.sh          # = bash .device-scale/device_scale.sh run .device-scale
#     RUNS="existing:8 existing:1 local:8" BUDGET=380 RECORDED=dask-1:1000:184.0 bash .device-scale/run.sh
# The device copies the session's own checkout, not a helper's worktree: run `prepare` from the worktree
# (the wheel is built from the checkout the script sits in) into an ignored folder of the session's
# checkout, and carry that folder.
#
# Each run has the whole machine, one after the other, and each is its own process with its own Prefect
# server (both pay the same first-flow-run costs a `spectr ingest --workers N` pays): the installed packages
# are byte-compiled first (as a plain pip install leaves them; the wheels go in with --no-compile, and
# processes importing uncompiled Prefect at once paid for it on the clock before), the adapters are
# generated, then the runs RUNS names, in its order, each MODE:WORKERS:
#   local:N     `spectr ingest --workers N`: a local cluster of N workers started by the run, on the clock;
#   existing:N  `spectr ingest --dask tcp://127.0.0.1:PORT`: off the clock, a `dask scheduler` and a `dask
#               worker --nworkers N --nthreads 1 --preload spectr.flows.dask_worker` are started (each in its
#               own process group) and waited for until all N workers are registered and done importing
#               what a batch needs (bench_scale.py wait-cluster); then the ingest is timed on that cluster,
#               and the cluster is torn down (its process groups killed) before the next run. PRIME=1: before
#               the clock, another process ingests 8*N adapters on it first (into a throwaway registry), so the
#               timed run finds workers that have run Prefect tasks before, as a cluster already in use does
#               (on the 2-core box a worker's first Prefect task started ~1 s after its submission, later
#               ones at once, also from another process: a one-time cost per worker process).
# RUNS defaults to "local:8 local:1" (plus local:2 with TWO=1; WORKERS="8 1" still names local runs). Every
# run has a time limit (RUN_LIMIT s, default 300), cut to what is left of BUDGET (s since the start, if set:
# no run starts with less than 30 s of it left, and the table is printed before it ends). The table with the
# speed-ups (each over the 1-worker run of its own mode; RECORDED=dask-1:1000:184.0 stands in, marked as
# recorded, for a mode whose 1-worker run is not in RUNS) and the start-up phases is printed at the end.
# Device seconds on 16 cores, estimated from the fourth pass (install ~20 s and generation ~6 s first; each
# run's process also starts its Prefect server, ~10 s): local:8 ~45 s, local:1 ~195 s; existing:8 ~55 s and
# existing:1 ~200 s with their clusters' start, not yet measured (local:8 and local:1 took 312 s in all).
# A dry run elsewhere: PYTHON=.venv/bin/python NO_INSTALL=1 ADAPTERS=40 RUNS="existing:2 existing:1 local:2"
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
# $OUT brings back 8 files at most: host.txt, each run's JSON, the combined JSON and markdown, and logs.tgz
# (every run's stderr, the clusters' logs, the import check: $work, packed at any exit).
work=${WORK:-/tmp/spectr-scale-logs}
rm -rf "$work"
mkdir -p "$out" "$work"
pack() { tar czf "$out/logs.tgz" -C "$work" . 2>/dev/null || true; }
trap pack EXIT
site=${SITE:-/tmp/spectr-site}
root=${SCALE_ROOT:-/tmp/spectr-scale}
export PREFECT_HOME=/tmp/spectr-prefect PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
       SPECTR_HOME=/tmp/spectr-home PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # a dry run elsewhere: see the header
install() { "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"; }
[ -n "${NO_INSTALL:-}" ] || install "$dir"/wheels/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
# Away from the checkout: its own spectr/ folder must not shadow the installed package.
check() { (cd /tmp && "$py" -c 'import prefect, prefect_dask, distributed, sqlalchemy, alembic, psutil, torch, transformers
from prefect.testing.utilities import prefect_test_harness
import spectr.flows.ingest, spectr.flows.dask_worker, spectr.pipeline.ingest, spectr.registry.store
import distributed.cli.dask_scheduler, distributed.cli.dask_worker  # an existing cluster: dask scheduler / worker
print("imports ok: prefect", prefect.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'); }
if ! check 2>"$work/import_check.txt"; then
    echo "imports failed without the stack wheels (see import_check.txt in logs.tgz); installing them too"
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
if [ -z "${RUNS:-}" ]; then
    RUNS=""
    for w in ${WORKERS:-8 1}; do RUNS+=" local:$w"; done
    [ -z "${TWO:-}" ] || RUNS+=" local:2"
fi
echo "runs: $RUNS${BUDGET:+ (budget $BUDGET s)}${RECORDED:+ (recorded: $RECORDED)}" | tee -a "$out/host.txt"

# An existing cluster's processes: each started in its own process group (job control on while it forks),
# all killed at the end of its run and on any exit of this script (a failure, a timeout, a signal).
groups=()
stop_groups() {
    [ ${#groups[@]} -gt 0 ] || return 0
    local g left
    for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for _ in $(seq 50); do  # up to 10 s to close
        left=0
        for g in "${groups[@]}"; do kill -0 -- "-$g" 2>/dev/null && left=1; done
        [ "$left" = 0 ] && break
        sleep 0.2
    done
    for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    sleep 0.2
    left=$(ps -e -o pgid= | awk -v gs=" ${groups[*]} " 'index(gs, " " $1 " ")' | wc -l) || left="?"
    echo "cluster torn down: process groups ${groups[*]} killed, $left process(es) left" | tee -a "$out/host.txt"
    groups=()
}
# The timed commands run in the background and are waited for: a signal to this script is then handled at
# once (bash runs a trap only after a foreground command ends), ends the command in hand, then the cluster.
child=
on_signal() { [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true; exit 143; }
trap 'stop_groups; pack' EXIT
trap on_signal TERM INT
waited() { "$@" & child=$!; local rc=0; wait "$child" || rc=$?; child=; return "$rc"; }
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_cluster() {  # $1 workers, $2 log prefix; sets $address
    local port
    port=$(free_port)
    address=tcp://127.0.0.1:$port
    set -m
    "$py" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$port" --no-dashboard >"$2.scheduler.log" 2>&1 &
    groups+=($!)
    "$py" -m distributed.cli.dask_worker "$address" --nworkers "$1" --nthreads 1 --no-dashboard \
        --host 127.0.0.1 --preload spectr.flows.dask_worker --death-timeout 60 \
        --local-directory "/tmp/spectr-dask-$1" >"$2.workers.log" 2>&1 &
    groups+=($!)
    set +m
}

# Seconds left of BUDGET (a large number without one).
left() { if [ -n "${BUDGET:-}" ]; then echo $(( BUDGET - ($(date +%s) - start) )); else echo 999999; fi; }
results=() failed=()
for run in $RUNS; do
    how=${run%%:*} w=${run#*:}
    case "$how" in local|existing) ;; *) echo "RUNS: $run is not local:N or existing:N" >&2; exit 2 ;; esac
    name=$how-$w
    budget=$(( $(left) - 15 ))  # 15 s kept for the table and the clean-up
    if [ "$budget" -lt 30 ]; then
        echo "== $name: SKIPPED, $(left) s of the budget left" | tee -a "$out/host.txt"
        continue
    fi
    lim=$(( limit < budget ? limit : budget ))
    if [ "$how" = existing ]; then
        echo "== existing cluster, $w worker(s): starting it off the clock ($(( $(date +%s) - start )) s in)"
        t=$(date +%s)
        start_cluster "$w" "$work/$name"
        wl=${WAIT_LIMIT:-180}  # s for the cluster to come up
        wl=$(( lim < wl ? lim : wl ))
        if ! waited timeout "$(( wl + 10 ))" "$py" "$dir/bench_scale.py" wait-cluster "$address" --workers "$w" \
                --timeout "$wl" >"$work/$name.wait.out" 2>"$work/$name.wait.err"; then
            cat "$work/$name.wait.out"
            echo "$name: the cluster did not come up (see $name.*.log, $name.wait.err in logs.tgz)" | tee -a "$out/host.txt"
            tail -n 5 "$work/$name.wait.err" "$work/$name.workers.log" || true
            failed+=("$name")
            stop_groups
            continue
        fi
        tee -a "$out/host.txt" <"$work/$name.wait.out"
        if [ -n "${PRIME:-}" ]; then  # a cluster that has served an ingest before: its workers' first Prefect task done
            waited timeout 120 "$py" "$dir/bench_scale.py" ingest --adapters $(( 8 * w )) --no-in-process --root "$root" \
                --dask "$address" --out "$work/$name.prime.json" >"$work/$name.prime.out" 2>"$work/$name.prime.err" \
                || echo "$name: priming exit $?"
            "$py" -c 'import json, sys; r = json.load(open(sys.argv[1]))[0]; w = r.get("driver", {}).get("workers", {})
print("primed: {} adapters in {} s (another process and Prefect server), batches on {} of the {} workers".format(
    r["adapters"], r["wall_s"], w.get("n"), sys.argv[2]))' "$work/$name.prime.json" "$w" 2>&1 | tee -a "$out/host.txt" || true
        fi
        budget=$(( $(left) - 15 ))
        lim=$(( limit < budget ? limit : budget ))
        echo "== $name: $w worker(s) of an existing cluster (up in $(( $(date +%s) - t )) s), alone on the machine ($(( $(date +%s) - start )) s in, limit $lim s)"
        waited timeout "$lim" "${bench[@]}" --dask "$address" --out "$out/$name.json" 2>"$work/$name.err" || { echo "$name: exit $?"; failed+=("$name"); }
        stop_groups
    else
        echo "== $name: $w worker(s), a local cluster per run, alone on the machine ($(( $(date +%s) - start )) s in, limit $lim s)"
        waited timeout "$lim" "${bench[@]}" --workers "$w" --out "$out/$name.json" 2>"$work/$name.err" || { echo "$name: exit $?"; failed+=("$name"); }
    fi
    [ -s "$out/$name.json" ] && results+=("$out/$name.json")
    memtotal "after $name" | tee -a "$out/host.txt"
    sleep 1  # the run's Prefect server and workers are gone before the next starts
done
recorded=()
for r in ${RECORDED:-}; do recorded+=(--recorded "$r"); done
[ ${#results[@]} -eq 0 ] || "$py" "$dir/bench_scale.py" combine "${results[@]}" ${recorded[@]+"${recorded[@]}"} \
    --out "$out/scale_ingest_16core.json" --md "$out/scale_ingest_16core.md"
rm -rf "$root"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/host.txt"
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" | tee -a "$out/host.txt"; exit 1; }
