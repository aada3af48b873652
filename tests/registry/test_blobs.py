from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from spectr.registry.blobs import BlobError, BlobStore


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_layout_and_no_temp_files(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    data = b"spectra" * 1000
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == f"{tmp_path / 'blobs'}/sha256/{sha[:2]}/{sha[2:]}.safetensors"
    assert store.exists(sha) and store.get(sha) == data
    assert store.put(data) == sha  # idempotent
    assert _files(tmp_path / "blobs") == [Path(store.path(sha))]  # no temp files left behind


def test_file_url_and_env_default(tmp_path, monkeypatch):
    assert BlobStore(f"file://{tmp_path}/b").root == f"{tmp_path}/b"
    monkeypatch.setenv("SPECTR_BLOB_URL", str(tmp_path / "env-blobs"))
    sha = BlobStore().put(b"x")
    assert (tmp_path / "env-blobs" / "sha256" / sha[:2]).is_dir()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = BlobStore(str(tmp_path))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"abc")
    assert _files(tmp_path) == []
    assert not store.exists(hashlib.sha256(b"abc").hexdigest())


def test_corrupt_and_missing_blobs_are_detected(tmp_path):
    store = BlobStore(str(tmp_path))
    sha = store.put(b"good bytes")
    Path(store.path(sha)).write_bytes(b"evil bytes")  # same size, different content
    with pytest.raises(BlobError, match="corrupt"):
        store.get(sha)
    Path(store.path(sha)).write_bytes(b"short")
    with pytest.raises(BlobError, match="exists with 5 bytes"):
        store.put(b"good bytes")
    store.delete(sha)
    assert not store.exists(sha)
    with pytest.raises(BlobError, match="missing"):
        store.get(sha)
    with pytest.raises(ValueError, match="not a sha256"):
        store.get("../../etc/passwd")


def test_fsspec_memory_store():
    pytest.importorskip("fsspec")
    store = BlobStore("memory://spectr-test-blobs")
    sha = store.put(b"remote")
    assert store.exists(sha) and store.get(sha) == b"remote"
    assert store.path(sha).endswith(f"/sha256/{sha[:2]}/{sha[2:]}.safetensors")
    store.delete(sha)
    assert not store.exists(sha)


def test_object_store_put_is_one_write_no_temp_no_move(monkeypatch):
    """memory:// stands in for S3 here (same rule: an object appears whole); S3 itself: test_s3_postgres."""
    import uuid

    store = BlobStore(f"memory://spectr-{uuid.uuid4().hex}")
    writes = []
    real_pipe = store._fs.pipe_file
    monkeypatch.setattr(store._fs, "pipe_file", lambda path, data, **kw: (writes.append(path), real_pipe(path, data)))
    for forbidden in ("mv", "copy", "rm_file"):
        monkeypatch.setattr(store._fs, forbidden, lambda *a, **k: pytest.fail("no temp object, copy or delete"))
    sha = store.put(b"spectra")
    assert writes == [store.path(sha)]
    assert store.get(sha) == b"spectra" and store.put(b"spectra") == sha and len(writes) == 1
