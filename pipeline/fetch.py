"""Turn what the user typed (folder, glob, hub id[@revision]) into local adapter folders."""
from __future__ import annotations

import glob
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

from spectr.pipeline.types import AdapterError, AdapterSource
from spectr.registry.names import check_expert_name

# Hub repo names: letters, digits, "-", "_", "."; revision: branch, tag or commit (may hold "/").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]+)?$", re.ASCII)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_GLOB_CHARS = set("*?[")
# Weight files are fetched even when refused later (.bin), so the refusal can say why.
ALLOW_PATTERNS = ["adapter_config.json", "*.safetensors", "adapter_model.bin", "README.md"]
T = TypeVar("T")


def is_hub_id(spec: str) -> bool:
    """True when spec is shaped like a hub repo id "org/name" with an optional "@revision"."""
    if not _HUB_ID.match(spec):
        return False
    repo = spec.split("@", 1)[0]
    return ".." not in repo and "--" not in repo and not repo.endswith(".")


def split_revision(spec: str) -> tuple[str, str | None]:
    """"org/name@rev" -> ("org/name", "rev"); no "@" -> (spec, None)."""
    repo, _, rev = spec.partition("@")
    return repo, (rev or None)


def expand_sources(specs: list[str]) -> list[str]:
    """Expand globs (sorted, folders only), keep folders and hub ids; anything else is an error."""
    out: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = [str(p)]
        elif p.exists():
            raise AdapterError(f"{spec}: not an adapter folder (a file was given)")
        elif _GLOB_CHARS & set(spec):
            found = sorted(m for m in glob.glob(str(p), recursive=True) if Path(m).is_dir())
            if not found:
                raise AdapterError(f"{spec}: the pattern matches no folder")
        elif is_hub_id(spec):
            found = [spec]
        else:
            raise AdapterError(f"{spec}: no such folder, and not a hub id org/name[@revision]")
        out.extend(f for f in found if f not in out)
    return out


def _snapshot_commit(folder: Path) -> str | None:
    # The HF cache keeps each snapshot under snapshots/<commit hash>/.
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return folder.name
    return None


def fetch(spec: str) -> AdapterSource:
    """A local adapter folder, or a hub snapshot (adapter files only) with its resolved commit hash."""
    p = Path(spec).expanduser()
    if p.is_dir():
        path = p.resolve()
        # The name is the folder as the user sees it: a symlinked "latest" keeps its link name.
        name = p.absolute().name or path.name
        try:
            check_expert_name(name)
        except ValueError as e:
            raise AdapterError(f"{spec}: {e}") from None
        return AdapterSource(name=name, path=path, source=str(path), revision=None)
    if p.exists():
        raise AdapterError(f"{spec}: not an adapter folder (a file was given)")
    if not is_hub_id(spec):
        raise AdapterError(f"{spec}: no such folder, and not a hub id org/name[@revision]")
    repo_id, revision = split_revision(spec)
    from huggingface_hub import snapshot_download

    try:
        # A commit's snapshot never changes: a cached one is used as it is (huggingface_hub 1.x, offline,
        # would otherwise try to list the repo's tree for a commit revision and fail).
        folder = _cached_commit(repo_id, revision) or Path(_with_deadline(
            lambda: snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS), spec))
    except AdapterError:
        raise
    except Exception as e:  # repo/revision missing, offline and not cached, gated, network
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AdapterError(
            f"{spec}: cannot fetch {repo_id} (revision {revision or 'main'}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {reason}"
        ) from None
    commit = _snapshot_commit(folder)
    if commit is None:
        commit = _remote_commit(repo_id, revision, spec)
    return AdapterSource(name=repo_id.split("/")[-1], path=folder, source=spec, revision=commit)


def _cached_commit(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a commit revision holding adapter_config.json, else None."""
    if revision is None or not _COMMIT.match(revision):
        return None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "adapter_config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def hub_timeout() -> float:
    """Seconds a hub fetch may take in all; SPECTR_HUB_TIMEOUT overrides the default of 300."""
    return float(os.environ.get("SPECTR_HUB_TIMEOUT", 300))


def _with_deadline(call: Callable[[], T], spec: str) -> T:
    """call() in a daemon thread, given up after hub_timeout(): huggingface_hub's HTTP client has no read
    timeout of its own, so an endpoint that accepts the connection and never answers would hang us forever."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name=f"spectr-hub-fetch {spec}", daemon=True)
    worker.start()
    worker.join(hub_timeout())
    if worker.is_alive():
        raise AdapterError(f"{spec}: the Hugging Face Hub did not answer within {hub_timeout():g} s "
                           f"(SPECTR_HUB_TIMEOUT); check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _remote_commit(repo_id: str, revision: str | None, spec: str) -> str:
    from huggingface_hub import HfApi

    try:
        sha = _with_deadline(lambda: HfApi().model_info(repo_id, revision=revision).sha, spec)
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{spec}: cannot resolve the commit of {repo_id}: {type(e).__name__}: {e}") from None
    if not sha or not _COMMIT.match(sha):
        raise AdapterError(f"{spec}: the hub returned no commit hash for {repo_id}")
    return sha


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached now. huggingface_hub retries a failing connection for
    about 25 s; a name that is neither a folder nor cached must fail at once when offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def locate_base_config(spec: str | Path) -> Path:
    """The config.json of a base model given as a folder (or its config.json) or a hub id org/name[@rev].

    A hub id is looked up in the local Hugging Face cache first; only when it is not there and the hub is
    reachable is config.json downloaded. AdapterError (one line, naming what to do) otherwise.
    """
    p = Path(spec).expanduser()
    if p.is_file() and p.name == "config.json":
        return p
    if p.is_dir():
        return p / "config.json"  # reading it names the file if it is missing
    if p.exists():
        raise AdapterError(f"{spec}: base model must be a folder holding config.json")
    if not is_hub_id(str(spec)):
        raise AdapterError(f"{spec}: no such base model folder, and not a hub id org/name[@revision]; "
                           "pass a folder holding config.json")
    repo_id, revision = split_revision(str(spec))
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if not hub_reachable():
        raise AdapterError(f"{spec}: base model is neither a folder nor in the local Hugging Face cache "
                           f"({repo_id}/config.json), and the hub cannot be reached; pass a folder holding config.json")
    try:
        return Path(_with_deadline(lambda: hf_hub_download(repo_id, "config.json", revision=revision), str(spec)))
    except Exception as e:  # missing repo, gated, network
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{repo_id}/config.json: cannot fetch base model config: {type(e).__name__}: {reason}") from None
