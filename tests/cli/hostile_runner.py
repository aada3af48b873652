"""Runs the hostile-input battery's cases through the `spectr` command's own entry, in this one process.

Started by tests/cli/test_hostile_cli.py in a child under RLIMIT_AS and RLIMIT_CPU (the memory and CPU bound);
each case also gets its own SIGALRM time bound. Usage: hostile_runner.py CASES.json RESULTS.jsonl

CASES.json: {"setup": [[args...], ...], "cases": [{"id", "args", "env"}], "db": PATH, "blobs": PATH}.
Each case writes one JSON line: what the command printed, its exit code, and whether the registry's rows or
the blob store's files changed. A line {"started": id} comes first, so a case that brings the whole process
down (over the CPU or memory limit) is still named.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import sqlite3
import sys
import time
from pathlib import Path

CASE_SECONDS = int(os.environ.get("SPECTR_HOSTILE_CASE_SECONDS", "60"))
# Rows a refused ingest may add: the run and its per-adapter results record the refusal (an audit trail).
RUN_TABLES = ("ingestion_runs", "ingestion_results")


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no `except Exception` in the command swallows it."""


def registry_rows(db: Path) -> dict[str, list]:
    """Every row of every table of the SQLite registry, read through a read-only connection."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        con.close()


def blob_files(root: Path) -> list[tuple[str, int]]:
    """Every file under the blob store (temp files included), with its size."""
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def changes(db: Path, blobs: Path, rows_before: dict, files_before: list) -> list[str]:
    """What a refused command changed: [] when nothing but the record of a refused run."""
    found = []
    rows_after = registry_rows(db)
    for table in sorted(set(rows_before) | set(rows_after)):
        before, after = rows_before.get(table, []), rows_after.get(table, [])
        if before == after:
            continue
        if table in RUN_TABLES and set(before) <= set(after):
            continue  # judged below, column by column
        found.append(f"table {table}: {len(before)} -> {len(after)} rows, or rows changed")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        for r in con.execute("SELECT * FROM ingestion_runs"):
            if repr(tuple(r)) not in rows_before.get("ingestion_runs", []) and r["accepted"]:
                found.append(f"a new ingestion run accepted {r['accepted']} adapters")
        for r in con.execute("SELECT * FROM ingestion_results"):
            if repr(tuple(r)) not in rows_before.get("ingestion_results", []) and r["status"] != "rejected":
                found.append(f"a new ingestion result {r['status']!r}")
    finally:
        con.close()
    if blob_files(blobs) != files_before:
        found.append("blob store files changed")
    return found


def _alarm(_signum, _frame):
    raise CaseTimeout()


def run_case(app, case: dict, db: Path, blobs: Path) -> dict:
    rows_before, files_before = registry_rows(db), blob_files(blobs)
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    out, err = io.StringIO(), io.StringIO()
    code, timed_out, crashed = None, False, None
    start = time.monotonic()
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = app(case["args"], prog_name="spectr", standalone_mode=False)
    except CaseTimeout:
        timed_out = True
    except BaseException as e:  # the command let something escape its one-line error handling
        crashed = f"{type(e).__name__}: {e}"[:2000]
    finally:
        signal.alarm(0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "id": case["id"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
        "seconds": round(time.monotonic() - start, 3), "timed_out": timed_out, "crashed": crashed,
        "changes": changes(db, blobs, rows_before, files_before),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(cases_file: str, results_file: str) -> int:
    spec = json.loads(Path(cases_file).read_text())
    signal.signal(signal.SIGALRM, _alarm)
    from spectr.cli import app

    db, blobs = Path(spec["db"]), Path(spec["blobs"])
    with open(results_file, "w") as results:
        for args in spec["setup"]:  # a registry to leave unchanged: an expert, an alias, a bundle
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = app(args, prog_name="spectr", standalone_mode=False)
            if code != 0:
                results.write(json.dumps({"setup_failed": args, "output": out.getvalue() + err.getvalue()}) + "\n")
                return 1
        for case in spec["cases"]:
            results.write(json.dumps({"started": case["id"]}) + "\n")
            results.flush()
            results.write(json.dumps(run_case(app, case, db, blobs)) + "\n")
            results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
