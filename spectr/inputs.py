"""Checks of the command line's model and bundle arguments, before anything heavy loads.

A base model for generate/eval must be a local folder (config.json, weights, tokenizer) or a hub id already
in the local Hugging Face cache: nothing is downloaded, and a wrong name fails at once.
"""
from __future__ import annotations

from pathlib import Path

BUNDLE_HINT = "create one with `spectr bundle create NAME --all -o PATH`"


def model_folder(spec: str | Path, option: str = "--base-model") -> Path:
    """The folder holding the model's config.json: spec itself, or a cached hub snapshot; ValueError otherwise."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{option} {spec}: the folder has no config.json; pass a transformers model folder")
        return p
    if p.exists():
        raise ValueError(f"{option} {spec}: a file, not a model folder; pass the folder holding config.json")
    from spectr.pipeline.fetch import is_hub_id, split_revision

    if is_hub_id(str(spec)):
        from huggingface_hub import snapshot_download

        repo_id, revision = split_revision(str(spec))
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # not in the cache: never downloaded here
            folder = None
        if folder is not None and (folder / "config.json").is_file():
            return folder
        raise ValueError(f"{option} {spec}: not in the local Hugging Face cache and nothing is downloaded here; "
                         "pass a model folder (config.json, weights, tokenizer)")
    raise ValueError(f"{option} {spec}: no such folder, and not a hub id org/name in the local cache; pass a model "
                     "folder (config.json, weights, tokenizer)")


def bundle_folder(spec: str | Path, option: str = "--bundle") -> Path:
    """A bundle folder (with manifest.json); ValueError naming what to do otherwise."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise ValueError(f"{option} {spec}: no such folder; {BUNDLE_HINT}")
    if (p / "manifest.json").exists() and not (p / "manifest.json").is_file():
        raise ValueError(f"{option} {spec}: {p / 'manifest.json'} is not a regular file")
    if not (p / "manifest.json").is_file():
        raise ValueError(f"{option} {spec}: not a bundle (no manifest.json); {BUNDLE_HINT}")
    return p
