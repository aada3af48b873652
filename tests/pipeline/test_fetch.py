"""fetch: local folders, globs, and hub ids resolved offline from a pre-populated HF cache."""
from __future__ import annotations


import pytest

from spectr.pipeline.fetch import expand_sources, fetch, is_hub_id
from spectr.pipeline.types import AdapterError
from spectr.pipeline.validate import load_adapter
from tests.pipeline.conftest import clone, make_hub_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAG_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.mark.parametrize(
    "spec,ok",
    [
        ("org/name", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("org/name@main", True),
        (f"org/name@{COMMIT}", True),
        ("org/name@refs/pr/1", True),
        ("name", False),
        ("/abs/path", False),
        ("./rel/path", False),
        ("a/b/c", False),
        ("org/na--me", False),
        ("org/na..me", False),
        ("org/name@", False),
        ("experts/*", False),
    ],
)
def test_is_hub_id(spec, ok):
    assert is_hub_id(spec) is ok


def test_expand_sources_globs_folders_and_hub_ids(tmp_path):
    for name in ["b_exp", "a_exp", "c_exp"]:
        (tmp_path / name).mkdir()
    (tmp_path / "notes.json").write_text("{}")  # files matched by a glob are not adapters
    got = expand_sources([str(tmp_path / "*"), str(tmp_path / "a_exp"), "org/name@v1"])
    assert got == [str(tmp_path / n) for n in ["a_exp", "b_exp", "c_exp"]] + ["org/name@v1"]


@pytest.mark.parametrize("spec", ["no-such-thing", "/definitely/not/here", "x/y/z"])
def test_expand_sources_rejects_what_is_neither(spec):
    with pytest.raises(AdapterError, match="no such folder"):
        expand_sources([spec])


def test_expand_sources_rejects_empty_glob_and_files(tmp_path):
    with pytest.raises(AdapterError, match="matches no folder"):
        expand_sources([str(tmp_path / "nothing-*")])
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(AdapterError, match="file.txt"):
        expand_sources([str(f)])


def test_fetch_local_folder(make_adapter):
    folder = make_adapter("plain")
    src = fetch(str(folder))
    assert src.name == "plain"
    assert src.path == folder.resolve()
    assert src.source == str(folder.resolve())
    assert src.revision is None


def test_fetch_hub_offline_resolves_commit(make_adapter, offline_hub, tiny_base):
    make_hub_cache(offline_hub, "someorg/my-expert", make_adapter("plain"), COMMIT, refs=("main",))
    for spec in ["someorg/my-expert", "someorg/my-expert@main", f"someorg/my-expert@{COMMIT}"]:
        src = fetch(spec)
        assert src.name == "my-expert"
        assert src.source == spec
        assert src.revision == COMMIT
        assert src.path.name == COMMIT
        assert (src.path / "adapter_config.json").is_file()
        assert (src.path / "adapter_model.safetensors").is_file()
    # the snapshot is a valid adapter folder
    assert len(load_adapter(fetch("someorg/my-expert"), tiny_base).modules) == 14


def test_fetch_hub_tag_resolves_to_its_commit(make_adapter, offline_hub):
    make_hub_cache(offline_hub, "someorg/tagged", make_adapter("plain"), COMMIT, refs=("main",))
    make_hub_cache_extra = offline_hub / "models--someorg--tagged"
    snap = make_hub_cache_extra / "snapshots" / TAG_COMMIT
    clone(make_adapter("plain", seed=1), snap)
    (make_hub_cache_extra / "refs" / "v1").write_text(TAG_COMMIT)
    assert fetch("someorg/tagged@v1").revision == TAG_COMMIT
    assert fetch("someorg/tagged").revision == COMMIT


def test_fetch_hub_unknown_repo_is_a_clear_error(offline_hub):
    with pytest.raises(AdapterError) as e:
        fetch("nobody/missing-repo")
    msg = str(e.value)
    assert "nobody/missing-repo" in msg and "Hugging Face Hub" in msg
    assert "\n" not in msg


def test_fetch_hub_unknown_revision_is_a_clear_error(make_adapter, offline_hub):
    make_hub_cache(offline_hub, "someorg/my-expert", make_adapter("plain"), COMMIT)
    with pytest.raises(AdapterError, match=r"someorg/my-expert.*revision nope"):
        fetch("someorg/my-expert@nope")


def test_fetch_rejects_a_file(tmp_path):
    f = tmp_path / "adapter_config.json"
    f.write_text("{}")
    with pytest.raises(AdapterError, match="a file was given"):
        fetch(str(f))
