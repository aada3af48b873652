"""8 writer processes released together: every one gets its version, none gets a spurious IntegrityError
(retrying once was not enough: SQLite 12/40 and PostgreSQL 23/40 failed before), and the numbers are 1..8."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from spectr.registry import Registry
from tests.registry.conftest import loaded, spectra_bytes

N = 8


def _writer(url: str, blobs: str, i: int, barrier, out) -> None:
    reg = Registry(url, blobs)
    try:
        data = spectra_bytes(i)
        blob = reg.blobs.put(data)
        barrier.wait()
        info, created = reg.add_version(loaded("racer", "0123456789abcdef"[i]), blob, method="exact", params={},
                                        energy=1.0, n_modules=1, size_bytes=len(data))
        out.put((i, info.version, created))
    except BaseException as e:  # reported to the parent, which fails the test
        out.put((i, repr(e), False))
    finally:
        reg.close()


def _race(url: str, blobs: str) -> list[tuple]:
    Registry(url, blobs).close()  # the schema exists; the race is about versions, the base and the adapter row
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(N), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, blobs, i, barrier, out)) for i in range(N)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    return results


def _check(results: list[tuple]) -> None:
    errors = [r for r in results if not isinstance(r[1], int)]
    assert errors == [], errors
    assert sorted(v for _, v, _ in results) == list(range(1, N + 1)) and all(c for _, _, c in results)


def test_eight_writers_sqlite(tmp_path):
    _check(_race(f"sqlite:///{tmp_path / 'reg.db'}", str(tmp_path / "blobs")))


@pytest.mark.postgres
def test_eight_writers_postgres(tmp_path):
    url = os.environ.get("SPECTR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPECTR_TEST_POSTGRES_URL is not set")
    from spectr.registry import db

    db.downgrade(url, "base")
    try:
        _check(_race(url, str(tmp_path / "blobs")))
    finally:
        db.downgrade(url, "base")
