"""Scale: ingest of generated SmolLM2-shaped rank-8 adapters with 1 and N workers, and catalog latency at
100 / 1,000 / 10,000 versions.

    .venv/bin/python benchmarks/bench_scale.py catalog --sizes 100,1000,10000
    .venv/bin/python benchmarks/bench_scale.py ingest --adapters 1000 --workers 1,2
    python3 benchmarks/bench_scale.py ingest --adapters 1000 --workers 1:300,2:600,8 --no-in-process --gen-procs 8
    python3 benchmarks/bench_scale.py generate --adapters 1000 --root /tmp/scale      # adapters only
    python3 benchmarks/bench_scale.py combine w8.json w1.json --md scale.md             # one table, ratios
    python3 benchmarks/bench_scale.py wait-cluster tcp://127.0.0.1:8786 --workers 8     # an existing cluster ready
    python3 benchmarks/bench_scale.py ingest --adapters 1000 --dask tcp://127.0.0.1:8786 --no-in-process

Existing cluster (--dask): the workers of a scheduler started beforehand (`dask scheduler`, `dask worker
--preload spectr.flows.dask_worker`: benchmarks/device_scale.sh starts them) run the batches, as `spectr
ingest --dask tcp://HOST:8786` does; wait-cluster returns once they are all registered and have imported what
a batch needs, so the timed run starts on warm workers. Its runner is named "dask-N-existing" (N: the
scheduler's workers) and its speed-up is over a "dask-1-existing" run; local clusters' runs ("dask-N") over
"dask-1".

Catalog: the registry is filled through SQLAlchemy Core with rows shaped as add_version writes them (one
shared spectra blob), then timed through catalog_sql: the first query after a change (builds the snapshot)
and the median of later ones (reuse), for a filter-and-group query and a listing page.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

QUERY = ("SELECT base_model, rank, count(*) AS n, avg(energy) AS energy FROM experts "
         "WHERE energy > 0.5 AND list_contains(target_modules, 'q_proj') GROUP BY ALL ORDER BY n DESC")


def fill(reg, n: int) -> None:
    from sqlalchemy import insert

    from spectr.registry.models import Adapter, AdapterVersion, BaseModelRow, Spectra

    blob = reg.blobs.put(b"spectra placeholder for the catalog benchmark")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    experts = max(1, n // 4)  # four versions per expert
    with reg.engine.begin() as c:
        c.execute(insert(BaseModelRow), [dict(id=1, name="HuggingFaceTB/SmolLM2-135M-Instruct",
                                              architecture="LlamaForCausalLM", model_type="llama",
                                              config={"hidden_size": 576}, config_sha256="b" * 64, created_at=t0)])
        c.execute(insert(Adapter), [dict(id=i + 1, name=f"expert-{i:05d}", base_model_id=1, created_at=t0)
                                    for i in range(experts)])
        c.execute(insert(AdapterVersion), [dict(
            id=v + 1, adapter_id=v % experts + 1, version=v // experts + 1, source=f"/adapters/expert-{v:05d}",
            revision=None, content_sha256=f"{v:064x}", config=config, rank=8, alpha=16.0,
            target_modules=["q_proj", "v_proj"], modules_to_save=[], n_modules=60, dense=False,
            ingestion_run_id=None, created_at=t0 + timedelta(seconds=v)) for v in range(n)])
        c.execute(insert(Spectra), [dict(
            version_id=v + 1, blob_sha256=blob, method="exact", params={"dtype": "float32"},
            params_sha256="c" * 64, energy=(v % 100) / 100, n_modules=60, size_bytes=1 << 20,
            created_at=t0 + timedelta(seconds=v)) for v in range(n)])


def bench_catalog(sizes: list[int], repeats: int) -> list[dict]:
    from spectr.registry import Registry
    from spectr.registry.catalog import catalog_page, catalog_sql

    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            os.environ["SPECTR_CATALOG_CACHE"] = f"{d}/cache"
            reg = Registry(f"sqlite:///{d}/reg.db", f"{d}/blobs")
            fill(reg, n)
            t = time.perf_counter()
            _, rows = catalog_sql(QUERY, reg)
            first = time.perf_counter() - t
            warm = []
            for _ in range(repeats):
                t = time.perf_counter()
                catalog_sql(QUERY, reg)
                warm.append(time.perf_counter() - t)
            page = []
            for _ in range(repeats):
                t = time.perf_counter()
                catalog_page(reg, 100, 0)
                page.append(time.perf_counter() - t)
            reg.close()
        r = dict(versions=n, groups=len(rows), first_query_s=round(first, 4),
                 query_median_ms=round(1000 * statistics.median(warm), 2),
                 page_median_ms=round(1000 * statistics.median(page), 2))
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("catalog")
    c.add_argument("--sizes", default="100,1000,10000")
    c.add_argument("--repeats", type=int, default=15)
    c.add_argument("--out", type=Path)
    i = sub.add_parser("ingest")
    i.add_argument("--adapters", type=int, default=1000)
    i.add_argument("--workers", default="1,2", help='worker counts, each optionally with its own adapter count: "1:300,8"')
    i.add_argument("--dask", metavar="ADDRESS", help="instead of local clusters: one run on the existing Dask "
                   "scheduler at ADDRESS (tcp://HOST:PORT), on --adapters adapters, with all its workers")
    i.add_argument("--no-in-process", dest="in_process", action="store_false",
                   help="skip the in-process runner (no Prefect, no Dask)")
    i.add_argument("--gen-procs", type=int, default=1, help="processes generating the adapters")
    i.add_argument("--stop-after", type=float, help="start no further run after this many seconds (a time-boxed "
                   "host); runs not started are listed as skipped")
    i.add_argument("--md", type=Path, help="also write the results as a markdown table here")
    i.add_argument("--out", type=Path)
    i.add_argument("--root", type=Path, help="keep the generated adapters here (reused by later runs)")
    i.add_argument("--label", default="", help="appended to the runners' names and registry folders "
                   "(e.g. --label=-2core): benchmarks running side by side on one --root")
    g = sub.add_parser("generate", help="only write the adapters (off the clock, before timed runs)")
    g.add_argument("--adapters", type=int, default=1000)
    g.add_argument("--root", type=Path, required=True)
    g.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    m = sub.add_parser("combine", help="merge result files, speed-ups over their 1-worker run of the same mode")
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--recorded", metavar="RUNNER:ADAPTERS:WALL", action="append", default=[],
                   help="a 1-worker run measured earlier (e.g. dask-1:1000:184.0), the reference of its mode "
                   "only where these files have no such run; marked as recorded in the table")
    m.add_argument("--md", type=Path)
    m.add_argument("--out", type=Path)
    w = sub.add_parser("wait-cluster", help="wait until an existing Dask scheduler has N workers, all done "
                       "importing what a batch needs")
    w.add_argument("address")
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--timeout", type=float, default=180)
    a = ap.parse_args()
    if a.what == "wait-cluster":
        wait_cluster(a.address, a.workers, a.timeout)
        return
    if a.what == "generate":
        t = time.perf_counter()
        make_adapters(a.root, a.adapters, procs=a.procs)
        print(f"generated {a.adapters} adapters in {time.perf_counter() - t:.1f} s under {a.root}", flush=True)
        return
    if a.what == "combine":
        res = combine(a.files, [parse_recorded(r) for r in a.recorded])
        print(markdown(res) + "\n" + phases(res))
        if a.md:
            a.md.write_text(markdown(res) + "\n" + phases(res))
    elif a.what == "catalog":
        res = bench_catalog([int(s) for s in a.sizes.split(",")], a.repeats)
    else:
        def save(results: list[dict]) -> None:  # after every run: a host that times out keeps what it measured
            if a.out:
                a.out.write_text(json.dumps(results, indent=1) + "\n")
            if a.md:
                a.md.write_text(markdown(results))

        runs = [(a.dask, a.adapters)] if a.dask else parse_runs(a.workers, a.adapters)
        res = bench_ingest(a.adapters, runs, a.root, a.in_process, a.gen_procs, a.stop_after, save, a.label)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


SMOLLM2_CONFIG = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct's shapes (config.json only: nothing downloaded)
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
SMOLLM2_MODULES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                   "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}


def _write_adapters(lib: Path, indices: list[int], rank: int) -> None:
    """Adapters number `indices`, each from its own seed (the same bytes whichever process writes it)."""
    import torch
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted(SMOLLM2_MODULES), "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True}
    torch.set_num_threads(1)
    for i in indices:
        folder = lib / f"gen-{i:04d}"
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(SMOLLM2_CONFIG["num_hidden_layers"]):
            for short, (out_f, in_f) in SMOLLM2_MODULES.items():
                part = "self_attn" if short in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{short}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def make_adapters(root: Path, n: int, rank: int = 8, procs: int = 1) -> tuple[Path, Path]:
    """(base folder with SmolLM2's config.json, folder of n adapters in PEFT's layout: bf16 factors of every
    linear module, as PEFT saves the shared library's experts), written with safetensors by `procs`
    processes. Adapters already there are kept."""
    base = root / "SmolLM2-135M-Instruct"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    lib = root / "adapters"
    lib.mkdir(exist_ok=True)
    if procs <= 1:
        _write_adapters(lib, list(range(n)), rank)
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(_write_adapters, [lib] * procs, [list(range(k, n, procs)) for k in range(procs)],
                          [rank] * procs))
    return base, lib


class CpuMeter:
    """CPU seconds of this process and all its descendants (the flow, the Dask workers, the Prefect server),
    sampled every 0.2 s so that children which exit before the end are counted; and the whole machine's
    busy CPU seconds over the same time (what the other users of a shared box took is the difference).
    `others` ({pid: role}) are processes outside this tree counted too: an existing cluster's scheduler and
    workers."""

    def __init__(self, others: dict[int, str] | None = None) -> None:
        import psutil

        self._psutil = psutil
        self._seen: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._role: dict[int, str] = dict(others or {})
        self._others = list(self._role)

    def _sample(self) -> None:
        me = self._psutil.Process()
        others = []
        for pid in self._others:
            try:
                others.append(self._psutil.Process(pid))
            except self._psutil.Error:
                pass
        for p in [me, *me.children(recursive=True), *others]:
            try:
                t = p.cpu_times()
                self._seen[p.pid] = t.user + t.system
                if p.pid not in self._role:
                    self._role[p.pid] = "driver" if p.pid == me.pid else _role(p.cmdline())
            except self._psutil.Error:
                pass

    def __enter__(self) -> "CpuMeter":
        import threading

        self._sample()
        self._base = dict(self._seen)
        m = self._psutil.cpu_times()
        self._machine0 = m.user + m.system + getattr(m, "nice", 0.0)
        self._load0 = os.getloadavg()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        m = self._psutil.cpu_times()
        self.machine_cpu_s = m.user + m.system + getattr(m, "nice", 0.0) - self._machine0
        self.cpu_s = sum(v - self._base.get(pid, 0.0) for pid, v in self._seen.items())
        self.by_role: dict[str, float] = {}
        for pid, v in self._seen.items():
            role = self._role.get(pid, "other")
            self.by_role[role] = round(self.by_role.get(role, 0.0) + v - self._base.get(pid, 0.0), 1)
        self.load_before, self.load_after = self._load0, os.getloadavg()[0]


def _role(cmdline: list[str]) -> str:
    """Which part of a run a descendant process is: Dask worker (spawned by a nanny), Prefect server, other."""
    line = " ".join(cmdline)
    if "spawn_main" in line:
        return "dask_workers"
    if "uvicorn" in line or "prefect" in line:
        return "prefect_server"
    return "other"


def parse_runs(workers: str, n: int) -> list[tuple[int, int]]:
    """"1:300,2,8" -> [(1, 300), (2, n), (8, n)]: worker counts, each with its own adapter count if given."""
    runs = []
    for part in workers.split(","):
        w, _, count = part.partition(":")
        runs.append((int(w), int(count) if count else n))
    return runs


def _mode(runner: str) -> str:
    """"existing" for runs on an existing cluster (dask-N-existing...), else "local" (dask-N..., in-process)."""
    return "existing" if "-existing" in runner else "local"


def _workers(runner: str) -> int | None:
    """dask-8-existing -> 8, dask-2-2core -> 2, in-process -> None."""
    head, _, rest = runner.partition("dask-")
    digits = "".join(itertools.takewhile(str.isdigit, rest))
    return int(digits) if not head and digits else None


def parse_recorded(spec: str) -> dict:
    """"dask-1:1000:184.0" -> a 1-worker run measured earlier: its runner, adapters and wall."""
    try:
        runner, adapters, wall = spec.split(":")
        r = dict(runner=runner, adapters=int(adapters), wall_s=float(wall), recorded=True)
    except ValueError:
        raise SystemExit(f"--recorded must be RUNNER:ADAPTERS:WALL_S (e.g. dask-1:1000:184.0), got {spec!r}")
    if _workers(runner) != 1:
        raise SystemExit(f"--recorded must name a 1-worker run (dask-1 or dask-1-existing), got {runner!r}")
    r["adapters_per_s"] = round(r["adapters"] / r["wall_s"], 2)
    return r


def _speedups(out: list[dict], recorded: list[dict] = ()) -> None:
    """Throughput over the 1-worker run's of the same mode (a local cluster's runs over "dask-1", an existing
    cluster's over "dask-1-existing"), so runs on different adapter counts compare; a recorded run (measured
    in an earlier call) stands in only where this set has no 1-worker run of its mode."""
    refs: dict[str, dict] = {}
    for r in [*out, *recorded]:  # measured first
        if not r.get("skipped") and _workers(r["runner"]) == 1:
            refs.setdefault(_mode(r["runner"]), r)
    for r in out:
        if not r.get("skipped"):
            ref = refs.get(_mode(r["runner"]))
            r["speedup_vs_dask_1"] = round(r["adapters_per_s"] / ref["adapters_per_s"], 2) if ref else None
            r["speedup_ref"] = (None if ref is None else
                                f"{ref['runner']} recorded earlier ({ref['adapters']} adapters in {ref['wall_s']} s),"
                                " not measured in this call" if ref.get("recorded") else ref["runner"])


def markdown(results: list[dict]) -> str:
    rows = ["| runner | adapters | wall | adapters/s | vs 1 worker (same mode) | CPU s (this run's processes) | "
            "start-up | workers idle | driver storing | load before / after |", "|---" * 10 + "|"]
    for r in results:
        if r.get("skipped"):
            rows.append(f"| {r['runner']} | {r['adapters']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        d = r.get("driver", {})
        idle = d.get("workers", {}).get("idle_s")
        store = d.get("seconds", {}).get("store")
        ref = r.get("speedup_ref") or ""
        ratio = "-" if not r.get("speedup_vs_dask_1") else (
            f"{r['speedup_vs_dask_1']}x" + (" (vs RECORDED)" if "recorded" in ref else ""))
        rows.append(f"| {r['runner']} | {r['adapters']} | {r['wall_s']} s | {r['adapters_per_s']} | "
                    f"{ratio} | {r['cpu_s']} | {r.get('startup_s', '-')} s | "
                    f"{idle if idle is not None else '-'} s | {store if store is not None else '-'} s | "
                    f"{r['load_avg_before']} / {r['load_avg_after']} |")
    first = next((r for r in results if not r.get("skipped")), {})
    notes = sorted({f"- {r['runner']}: speed-up over {r['speedup_ref']}" for r in results
                    if "recorded" in (r.get("speedup_ref") or "")})
    return (f"Machine: {first.get('machine', '?')}, {first.get('cores', '?')} cores\n\n" + "\n".join(rows) + "\n"
            + ("\n" + "\n".join(notes) + "\n" if notes else ""))


def phases(results: list[dict]) -> str:
    """Where each distributed run's wall went, in seconds from the call of ingest_on_dask (its own marks and
    the driver's DriverTimes): the fixed start and end around the batches, and the batches' span."""
    rows = ["| runner | cluster up | flow body | driver ready | imports done (last worker) | first batch starts | "
            "all workers busy | batches (first start -> last end) | last end -> call returns | wall |",
            "|---" * 10 + "|"]
    for r in results:
        d, c = r.get("driver"), r.get("call_s", {})
        if r.get("skipped") or not d or "workers" not in d:
            continue
        w, t0 = d["workers"], r["startup_s"]  # t0: the driver's DriverTimes start, from the call
        imports = w.get("imports_done_per_worker_s") or []
        returned = c.get("returned", r["wall_s"])
        done = t0 + max(imports) if imports else None  # an existing cluster's: before the call
        rows.append("| {} | {} | {} | {:.2f} | {} | {:.2f} | {:.2f} | {:.1f} | {:.2f} | {} |".format(
            r["runner"], c.get("cluster_ready", "-"), c.get("body", "-"), t0,
            "-" if done is None else f"{done:.2f}" if done >= 0 else f"before the call ({done:.0f})",
            t0 + w["first_task_started_s"],
            t0 + max(w["first_start_per_worker_s"]), w["last_task_ended_s"] - w["first_task_started_s"],
            returned - t0 - w["last_task_ended_s"], r["wall_s"]))
    return ("Seconds from the call of ingest_on_dask (\"cluster up\": a local cluster's; an existing cluster was up "
            "and its workers' imports done before the call):\n\n" + "\n".join(rows) + "\n")


def combine(files: list[Path], recorded: list[dict] = ()) -> list[dict]:
    """The runs of several result files (benchmarks run one after another or side by side), speed-ups
    recomputed over the 1-worker run of each one's mode (recorded: see _speedups)."""
    out = [r for f in files for r in json.loads(f.read_text())]
    _speedups(out, recorded)
    return out


def _cluster(address: str) -> tuple[int, dict[int, str]]:
    """An existing Dask cluster's worker count and its processes ({pid: role}: scheduler, workers)."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        pids = {pid: "dask_workers" for pid in client.run(os.getpid).values()}
        pids[client.run_on_scheduler(os.getpid)] = "dask_scheduler"
    return len(pids) - 1, pids


def _warmed() -> float | None:
    """On a worker: when its preloaded spectr.flows.dask_worker finished importing what a batch needs, or None."""
    import sys

    module = sys.modules.get("spectr.flows.dask_worker")
    return getattr(module, "WARMED_AT", None)


def wait_cluster(address: str, workers: int, timeout: float) -> None:
    """Returns once the scheduler at `address` has `workers` workers, each done importing what a batch needs
    (their preload's imports; a worker without the preload is made to import them); exits non-zero past
    `timeout` seconds."""
    from distributed import Client

    t = time.monotonic()
    deadline = t + timeout
    with Client(address, timeout=timeout) as client:
        while True:
            n = len(client.scheduler_info(n_workers=-1)["workers"])
            warmed = client.run(_warmed) if n >= workers else {}
            if n >= workers and all(v is not None for v in warmed.values()):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"wait-cluster: {n} of {workers} workers registered, "
                                 f"{sum(v is not None for v in warmed.values())} done importing after {timeout:.0f} s")
            time.sleep(0.5)
        from spectr.flows.dask_worker import warm_imports

        client.run(warm_imports)  # everything is imported already: returns at once, proves it on every worker
        last = max(warmed.values())
    print(f"cluster ready: {n} workers at {address}, imports done on all, {time.monotonic() - t:.1f} s of waiting "
          f"(last worker's imports done {time.time() - last:.1f} s ago)", flush=True)


def bench_ingest(n: int, runs: list[tuple[int | str, int]], root: Path | None = None, in_process: bool = True,
                 gen_procs: int = 1, stop_after: float | None = None, save=None, label: str = "") -> list[dict]:
    """The in-process runner (on n adapters), then Prefect's Dask task runner on local clusters of each
    worker count (or, where a run's first item is a scheduler's address, on that existing cluster), each
    into a fresh registry (removed after it is measured), one after the other in this run. One Prefect
    server is started first and shared (without one configured, every Dask run would pay a temporary
    server's start). An existing cluster's scheduler and workers count in the run's CPU seconds."""
    import platform
    import shutil

    from prefect.testing.utilities import prefect_test_harness

    from spectr.flows import ingest as flows_ingest
    from spectr.flows.ingest import ingest_on_dask
    from spectr.pipeline import ingest as pipeline_ingest
    from spectr.pipeline.ingest import ingest_sources

    started = time.monotonic()
    keep = root is not None
    root = root or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    most = max([n if in_process else 0, *(c for _, c in runs)])
    t = time.perf_counter()
    base, lib = make_adapters(root, most, procs=gen_procs)
    print(f"generated {most} adapters in {time.perf_counter() - t:.1f} s under {lib}", flush=True)
    # Every run in this process shares its imports and the base model's module table: built once here, so
    # that the first run measured does not pay alone for importing torch and transformers (2-8 s).
    from spectr.pipeline.basemodel import resolve_base_model

    resolve_base_model(str(base), name="HuggingFaceTB/SmolLM2-135M-Instruct")
    out = []
    plan = ([("in-process", None, n)] if in_process else []) + [
        (f"dask-{w}-existing" if isinstance(w, str) else f"dask-{w}", w, c) for w, c in runs]
    with prefect_test_harness(server_startup_timeout=120):
        for how, workers, count in plan:
            if stop_after is not None and time.monotonic() - started > stop_after:
                out.append(dict(runner=how, adapters=count, skipped=f"past --stop-after {stop_after:.0f} s"))
                print(json.dumps(out[-1]), flush=True)
                continue
            address, others = (workers, None) if isinstance(workers, str) else (None, None)
            if address:  # named by the scheduler's workers now
                workers, others = _cluster(address)
                how = f"dask-{workers}-existing"
            how = f"{how}{label}"
            home = root / f"home-{how}"
            shutil.rmtree(home, ignore_errors=True)  # every runner starts from an empty registry
            sources = [str(lib / f"gen-{i:04d}") for i in range(count)]
            kw = dict(base_model=str(base), base_name="HuggingFaceTB/SmolLM2-135M-Instruct",
                      registry_url=f"sqlite:///{home}/registry.db", blob_url=str(home / "blobs"))
            pipeline_ingest.LAST_DRIVER_TIMES = None
            with CpuMeter(others) as cpu:
                t = time.perf_counter()
                called = time.time()
                if workers is None:
                    outcomes = [o.to_dict() for o in ingest_sources(sources, **kw)]
                elif address:
                    outcomes = ingest_on_dask(sources, address=address, **kw)
                else:
                    outcomes = ingest_on_dask(sources, workers=workers, **kw)
                wall = time.perf_counter() - t
            statuses = [o["status"] for o in outcomes]
            steps: dict[str, float] = {}  # each adapter's seconds per step (validate, spectra, files, store), summed
            for o in outcomes:
                for k, v in o["seconds"].items():
                    steps[k] = steps.get(k, 0.0) + v
            shutil.rmtree(home, ignore_errors=True)  # ~15 MB of blobs per adapter
            r = dict(runner=how, adapters=count, new=statuses.count("new"), wall_s=round(wall, 1),
                     adapters_per_s=round(count / wall, 2), cpu_s=round(cpu.cpu_s, 1),
                     machine_cpu_s=round(cpu.machine_cpu_s, 1), load_avg_before=round(cpu.load_before, 2),
                     load_avg_after=round(cpu.load_after, 2), cores=os.cpu_count(), machine=platform.platform(),
                     cpu_s_by_role=cpu.by_role, step_s={k: round(v, 1) for k, v in steps.items()})
            driver = pipeline_ingest.LAST_DRIVER_TIMES
            if workers is not None and driver is not None:
                # from the call to the flow's body: flow run created, cluster started (workers spawned)
                r["startup_s"] = round(driver.started - called, 2)
                r["driver"] = driver.summary()
                # ingest_on_dask's own points from the call: cluster_ready, body, body_end, returned
                r["call_s"] = {k: round(v - called, 2) for k, v in flows_ingest.LAST_CALL_TIMES.items()}
            print(json.dumps(r), flush=True)
            out.append(r)
            _speedups(out)
            if save:
                save(out)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
