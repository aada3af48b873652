"""Content-addressed blob store: <root>/sha256/ab/cdef....safetensors, keyed by the bytes' sha256."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from spectr.registry.settings import blob_url

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BlobError(RuntimeError):
    """A blob is missing or its bytes do not match its hash."""


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _HEX64.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class BlobStore:
    """Local folder (plain path or file://) with atomic writes; other URLs go through fsspec."""

    def __init__(self, url: str | None = None) -> None:
        url = url if url is not None else blob_url()
        self.url = url
        self._fs = None
        if url.startswith("file://"):
            url = url[len("file://"):]
        if "://" in url:
            import fsspec  # only needed for remote stores

            self._fs, self.root = fsspec.core.url_to_fs(url)
            self.root = self.root.rstrip("/")
        else:
            self.root = str(Path(url).expanduser())

    def path(self, sha256: str) -> str:
        s = _check_sha(sha256)
        return f"{self.root}/sha256/{s[:2]}/{s[2:]}.safetensors"

    def exists(self, sha256: str) -> bool:
        p = self.path(sha256)
        return self._fs.exists(p) if self._fs else os.path.isfile(p)

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        if self._fs is not None:
            return self._put_remote(sha, dest, data)
        if os.path.isfile(dest):
            size = os.path.getsize(dest)
            if size != len(data):
                raise BlobError(f"blob {dest} exists with {size} bytes, expected {len(data)}; remove it")
            return sha
        folder = os.path.dirname(dest)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)
        return sha

    def _put_remote(self, sha: str, dest: str, data: bytes) -> str:
        fs = self._fs
        if fs.exists(dest):
            size = fs.size(dest)
            if size != len(data):
                raise BlobError(f"blob {dest} exists with {size} bytes, expected {len(data)}; remove it")
            return sha
        if _atomic_objects(fs):
            # An object store makes a PUT (or a completed multipart upload) visible whole or not at all:
            # one request, no temp object to copy and delete.
            fs.pipe_file(dest, data)
            return sha
        # Other filesystems (sftp, smb, ...) may show a half-written file: write a temp name, then move.
        tmp = f"{dest}.tmp-{os.getpid()}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, dest)
        return sha

    def get(self, sha256: str) -> bytes:
        p = self.path(sha256)
        try:
            if self._fs is not None:
                data = self._fs.cat_file(p)
            else:
                with open(p, "rb") as fh:
                    data = fh.read()
        except FileNotFoundError:
            raise BlobError(f"blob {sha256} is missing: {p}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise BlobError(f"blob {p} is corrupt: sha256 {got}, expected {sha256} ({len(data)} bytes)")
        return data

    def shas(self) -> list[str]:
        """Every blob's sha256 in the store (local folders and fsspec stores alike)."""
        root = f"{self.root}/sha256"
        if self._fs is not None:
            names = self._fs.find(root) if self._fs.exists(root) else []
        else:
            names = [str(p) for p in Path(root).glob("*/*")] if os.path.isdir(root) else []
        found = []
        for name in names:
            prefix, file = name.replace("\\", "/").split("/")[-2:]
            sha = prefix + file.removesuffix(".safetensors")
            if file.endswith(".safetensors") and _HEX64.match(sha):
                found.append(sha)
        return sorted(found)

    def stale_temp_files(self, grace_s: float = 3600.0) -> list[str]:
        """Temp files of writes that died (a killed process leaves its `.tmp-*`), older than grace_s."""
        root = Path(self.root) / "sha256"
        if self._fs is not None or not root.is_dir():
            return []
        cutoff, found = time.time() - grace_s, []
        for tmp in sorted(root.glob("*/.tmp-*")):
            try:
                if tmp.stat().st_mtime < cutoff:
                    found.append(str(tmp))
            except FileNotFoundError:  # finished or swept meanwhile
                pass
        return found

    def sweep_temp(self, grace_s: float = 3600.0) -> list[str]:
        """Remove stale_temp_files(grace_s); the paths removed."""
        removed = []
        for tmp in self.stale_temp_files(grace_s):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:  # another sweeper was first
                pass
        return removed

    def delete(self, sha256: str) -> None:
        p = self.path(sha256)
        if self._fs is not None:
            if self._fs.exists(p):
                self._fs.rm_file(p)
        elif os.path.isfile(p):
            os.unlink(p)


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


def _atomic_objects(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool(_OBJECT_STORES.intersection(protocols))


def _fsync_dir(folder: str) -> None:
    # Makes the rename durable; not possible on every platform (Windows), so best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
