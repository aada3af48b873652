"""The hostile-input battery, at the command line: every case is refused with one line that names the file or
value, a non-zero exit, the registry's rows and the blob store's files unchanged, within a time and memory bound.

All cases run in ONE child process (tests/cli/hostile_runner.py) through the `spectr` command's own entry
(the root group's error handling included), under RLIMIT_AS (memory) and RLIMIT_CPU, each case with its own
SIGALRM bound; the child reports one JSON line per case, which the parametrized test below judges. A few
cases also go through the installed `spectr` executable under the same limits.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.hostile_runner import blob_files, changes, registry_rows
from tests.cli.test_eval_cli import setup  # noqa: F401  (a saved tiny model with a tokenizer, and a bundle)
from tests.pipeline.conftest import clone, edit_config
from tests.pipeline.test_hostile import _sparse_giant

MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of the child: the spectr process itself needs about 1.6 GB of address space
CPU_LIMIT = 900  # RLIMIT_CPU seconds of the child, all cases together
CASE_SECONDS = 60  # SIGALRM per case (wall clock, generous for a loaded 2-core box)
Q0 = "model.layers.0.self_attn.q_proj"
HUGE_SQL = "select sum(a.range * b.range) from range(100000000) a, range(100000000) b"
SECRET = b"\xffSECRET-BYTES-0123456789"


def _limits() -> None:  # preexec_fn of every child: the memory and CPU bound
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT))


# ---- building the hostile inputs ------------------------------------------------------------------------


def _raw_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def _config_with(folder: Path, key: str, raw_value: str) -> None:
    """Set config[key] to a raw JSON token (NaN, Infinity, a 5000-digit number ...)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[key] = "@@"
    _raw_config(folder, json.dumps(cfg).replace('"@@"', raw_value))


def _manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def build_cases(root: Path, good: Path, wide: Path, base: Path, gen: dict) -> list[dict]:
    """Each case: id, args, env, kind ('rejected': the ingest line on stdout; 'error': `error:` on stderr),
    needles (all in the reason line), code (expected exit, default: any non-zero), secret (never echoed)."""
    cases: list[dict] = []

    def case(cid: str, args: list, *needles: str, kind: str = "error", env: dict | None = None,
             code: int | None = None, secret: str | None = None) -> None:
        cases.append(dict(id=cid, args=[str(a) for a in args], needles=list(needles), kind=kind, env=env or {},
                          code=code, secret=secret))

    def adapter(cid: str, folder_name: str | None = None) -> Path:
        return clone(good, root / "adapters" / (folder_name or f"h-{cid}"))

    def ingest(cid: str, folder: Path, *needles: str, env: dict | None = None, secret: str | None = None,
               source: str | None = None) -> None:
        case(cid, ["ingest", source or folder, "--base-model", base], *needles, kind="rejected", env=env,
             secret=secret)

    # -- adapter_config.json: shapes of the file itself
    f = adapter("config-fifo")
    (f / "adapter_config.json").unlink()
    os.mkfifo(f / "adapter_config.json")
    ingest("config-fifo", f, str(f / "adapter_config.json"), "not a regular file")
    f = adapter("config-dev-zero")
    (f / "adapter_config.json").unlink()
    (f / "adapter_config.json").symlink_to("/dev/zero")
    ingest("config-dev-zero", f, str(f / "adapter_config.json"), "not a regular file")
    f = adapter("config-over-limit")
    edit_config(f, notes="x" * 4000)  # over a limit that the base model's config.json (717 bytes) stays under
    ingest("config-over-limit", f, "adapter_config.json", "over the 2048-byte limit", "SPECTR_MAX_JSON_BYTES",
           env={"SPECTR_MAX_JSON_BYTES": "2048"})
    f = adapter("config-sparse-10gb")
    with open(f / "adapter_config.json", "r+b") as fh:
        fh.truncate(10 << 30)  # 10 GB claimed, nothing on disk
    ingest("config-sparse-10gb", f, "adapter_config.json", "limit", "SPECTR_MAX_JSON_BYTES")
    f = adapter("config-deep")
    _raw_config(f, '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    ingest("config-deep", f, "adapter_config.json", "nested too deeply")
    f = adapter("config-malformed")
    _raw_config(f, '{"r": 4, "lora_alpha": ')
    ingest("config-malformed", f, "adapter_config.json", "invalid JSON")
    f = adapter("config-not-object")
    _raw_config(f, "[1, 2, 3]")
    ingest("config-not-object", f, "adapter_config.json")
    f = adapter("rank-5000-digits")
    _config_with(f, "r", "9" * 5000)
    ingest("rank-5000-digits", f, "adapter_config.json", "invalid JSON")
    f = adapter("rank-zero")
    edit_config(f, r=0)
    ingest("rank-zero", f, "adapter_config.json", "r must be a positive integer")
    f = adapter("peft-type-huge")
    edit_config(f, peft_type="X" * 100_000)
    ingest("peft-type-huge", f, "adapter_config.json", "only LORA adapters")
    f = adapter("dora")
    edit_config(f, use_dora=True)
    ingest("dora", f, "adapter_config.json", "DoRA")

    # -- scaling: non-finite alpha and alpha_pattern
    for cid, raw in [("alpha-inf", "Infinity"), ("alpha-nan", "NaN"), ("alpha-minus-inf", "-Infinity"),
                     ("alpha-1e999", "1e999"), ("alpha-string", '"8"')]:
        f = adapter(cid)
        _config_with(f, "lora_alpha", raw)
        ingest(cid, f, "adapter_config.json", "lora_alpha must be a finite number")
    f = adapter("alpha-1e308")
    edit_config(f, lora_alpha=1e308)
    ingest("alpha-1e308", f, "adapter_config.json", "not a finite float32")
    for cid, raw in [("alpha-pattern-nan", "NaN"), ("alpha-pattern-string", '"x"')]:
        f = adapter(cid)
        cfg = json.loads((f / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {"q_proj": "@@"}
        _raw_config(f, json.dumps(cfg).replace('"@@"', raw))
        ingest(cid, f, "adapter_config.json", "alpha_pattern['q_proj'] must be a finite number")

    # -- rank_pattern and layers_to_transform
    for cid, value in [("rank-pattern-zero", 0), ("rank-pattern-string", "4")]:
        f = adapter(cid)
        edit_config(f, rank_pattern={"q_proj": value})
        ingest(cid, f, "adapter_config.json", "rank_pattern['q_proj'] must be a positive integer")
    f = adapter("rank-pattern-bad-regex")
    edit_config(f, rank_pattern={"q_proj(": 4})
    ingest("rank-pattern-bad-regex", f, "adapter_config.json", "is not a valid regex")
    f = adapter("rank-pattern-catastrophic")
    edit_config(f, rank_pattern={"(.|.)*[^a-z_]": 8})  # exponential backtracking on every module name
    ingest("rank-pattern-catastrophic", f, "adapter_config.json", "took over", "simplify the pattern")
    for cid, layers in [("layers-as-string", "0"), ("layers-mixed", [0, "1"])]:
        f = adapter(cid)
        edit_config(f, layers_to_transform=layers)
        ingest(cid, f, "adapter_config.json", "layers_to_transform must be an integer or a list of integers")

    # -- weights
    ingest("rank-above-width", wide, "adapter_model.safetensors", "rank 80 exceeds min(d_in, d_out) = 64")
    f = adapter("weights-fifo")
    (f / "adapter_model.safetensors").unlink()
    os.mkfifo(f / "adapter_model.safetensors")
    ingest("weights-fifo", f, str(f / "adapter_model.safetensors"), "not a regular file")
    f = adapter("weights-dev-zero")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_model.safetensors").symlink_to("/dev/zero")
    ingest("weights-dev-zero", f, str(f / "adapter_model.safetensors"), "not a regular file")
    f = adapter("weights-sparse-giant")
    w = _sparse_giant(f, 32_000, 64 * 1000)  # 8 GB claimed (twice the memory limit), a few KB on disk
    ingest("weights-sparse-giant", f, str(w), "more than any LoRA adapter of base", "refused unread")
    f = adapter("weights-header-beyond-file")
    (f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    ingest("weights-header-beyond-file", f, "adapter_model.safetensors", "not a safetensors file")
    f = adapter("weights-corrupt-secret")
    (f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(SECRET)) + SECRET)
    ingest("weights-corrupt-secret", f, "adapter_model.safetensors", "corrupt safetensors header",
           secret="SECRET-BYTES")
    f = adapter("weights-root-only-link")
    private = root / "private" / "root-only.bin"
    private.parent.mkdir(exist_ok=True)
    private.write_bytes(SECRET * 4)
    private.chmod(0)  # unreadable to others; root reads it anyway, and then its bytes must not be echoed
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_model.safetensors").symlink_to(private)
    ingest("weights-root-only-link", f, "adapter_model.safetensors", "not a safetensors file",
           secret=str(struct.unpack("<Q", SECRET[:8])[0]))  # the first 8 bytes, as the length they would be
    f = adapter("weights-missing")
    (f / "adapter_model.safetensors").unlink()
    ingest("weights-missing", f, "missing adapter_model.safetensors")
    f = adapter("weights-nan")
    from safetensors.torch import load_file, save_file

    t = load_file(f / "adapter_model.safetensors")
    t[f"base_model.model.{Q0}.lora_B.weight"][0, 0] = float("nan")
    save_file(t, f / "adapter_model.safetensors")
    ingest("weights-nan", f, "adapter_model.safetensors", "NaN/Inf")
    f = adapter("weights-pickle")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a real pickle; never opened
    ingest("weights-pickle", f, "adapter_model.bin", "pickle weights are refused")

    # -- names and paths
    for cid, folder in [("name-at", "a@b"), ("name-comma", "a,b"), ("name-bracket", "x[red]"),
                        ("name-dash", "-dash"), ("name-too-long", "n" * 129)]:
        f = adapter(cid, folder)
        ingest(cid, f, f"expert name '{folder[:80]}", "letters, digits")
    inner = root / "dotdot" / "inner"
    clone(good, root / "dotdot" / "adapter-files")
    inner.mkdir()
    for p in (root / "dotdot" / "adapter-files").iterdir():
        shutil.copy(p, root / "dotdot" / p.name)
    ingest("name-dot-dot", inner, "expert name '..'", source=f"{inner}/..")
    case("path-bracket-markup", ["ingest", "adapters/nope[/x]", "--base-model", base], "adapters/nope[/x]")
    case("path-missing", ["ingest", root / "no-such-adapter", "--base-model", base], str(root / "no-such-adapter"))

    # -- base models and the hub, offline
    missing_base = root / "no-such-base"
    case("base-missing-folder", ["ingest", good, "--base-model", missing_base], str(missing_base),
         "pass a folder holding config.json")
    case("base-bare-word", ["ingest", good, "--base-model", "smol"], "smol: no such base model folder")
    case("source-hub-id-offline", ["ingest", "nobody/nothing", "--base-model", base], "nobody/nothing",
         "outgoing traffic has been disabled", kind="rejected")
    case("base-hub-id-offline", ["ingest", good, "--base-model", "nobody/nothing"], "nobody/nothing",
         "local Hugging Face cache")
    f = adapter("base-unregistered")
    edit_config(f, base_model_name_or_path="nobody/unregistered-base")
    case("base-unregistered", ["ingest", f], "nobody/unregistered-base", kind="rejected")

    # -- the registry: read-only database, unknown names
    db = root / "home" / "registry.db"
    case("registry-read-only", ["ingest", wide.parent / "hnew", "--base-model", base], "the registry database refused",
         "readonly", env={"SPECTR_REGISTRY_URL": f"sqlite:///file:{db}?mode=ro&uri=true"})
    out = root / "out"
    case("bundle-unknown-expert", ["bundle", "create", "b2", "--experts", "nobody", "-o", out / "b1"],
         "no expert named 'nobody'")
    case("bundle-unknown-alias", ["bundle", "create", "b2", "--experts", "hgood@nope", "-o", out / "b2"],
         "hgood", "nope")
    case("bundle-unknown-version", ["bundle", "create", "b2", "--experts", "hgood@99", "-o", out / "b3"],
         "hgood", "99")
    case("bundle-bad-selector", ["bundle", "create", "b2", "--experts", "a@b@c", "-o", out / "b4"], "a@b@c")
    case("bundle-bracket-name", ["bundle", "create", "x[/red]", "--experts", "hgood", "-o", out / "b5"], "x[/red]")
    case("export-unknown-expert", ["export", "nobody", "-o", out / "e1"], "nobody")
    case("export-unknown-alias", ["export", "hgood@nope", "-o", out / "e2"], "nope")
    case("bundle-export-unknown", ["bundle", "export", "nobundle", "-o", out / "e3"], "nobundle")
    case("alias-on-unknown-version", ["alias", "set", "hgood", "staging", "99"], "99")
    case("alias-bad-name", ["alias", "set", "hgood", "a@b", "1"], "a@b")

    # -- catalog --sql
    case("sql-delete", ["catalog", "--sql", "DELETE FROM experts"], "read-only", code=2)
    case("sql-two-statements", ["catalog", "--sql", "SELECT 1; DROP TABLE experts"], "exactly one statement", code=2)
    case("sql-read-file", ["catalog", "--sql", "SELECT * FROM read_text('/etc/passwd')"], "catalog query failed",
         code=2)
    case("sql-runaway", ["catalog", "--sql", HUGE_SQL], "stopped after 0.5 s", "SPECTR_SQL_TIMEOUT", code=2,
         env={"SPECTR_SQL_TIMEOUT": "0.5"})

    # -- tampered bundles, handed to generate
    def bundle(cid: str) -> Path:
        return Path(shutil.copytree(gen["bundle"], root / "bundles" / cid))

    def generate(cid: str, b: Path, *needles: str, secret: str | None = None) -> None:
        case(cid, ["generate", "--base-model", gen["base"], "--bundle", b, "--prompt", "w1", "--max-new-tokens", "2"],
             *needles, secret=secret)

    b = bundle("bundle-file-outside")
    _manifest(b, lambda m: m["spectra"].update(file="../../etc/passwd"))
    generate("bundle-file-outside", b, "manifest.json", "not a plain file name", secret="root:")
    b = bundle("bundle-file-dev-zero")
    _manifest(b, lambda m: m["spectra"].update(file="/dev/zero"))
    generate("bundle-file-dev-zero", b, "manifest.json", "not a plain file name")
    b = bundle("bundle-spectra-link-dev-zero")
    name = json.loads((b / "manifest.json").read_text())["spectra"]["file"]
    (b / name).unlink()
    (b / name).symlink_to("/dev/zero")
    generate("bundle-spectra-link-dev-zero", b, str(b / name), "not a regular file")
    b = bundle("bundle-hash-mismatch")
    data = bytearray((b / name).read_bytes())
    data[-1] ^= 1
    (b / name).write_bytes(bytes(data))
    generate("bundle-hash-mismatch", b, str(b / name), "does not match the manifest")
    b = bundle("bundle-manifest-malformed")
    (b / "manifest.json").write_text('{"format": ')
    generate("bundle-manifest-malformed", b, "manifest.json", "invalid JSON")
    b = bundle("bundle-manifest-deep")
    (b / "manifest.json").write_text('{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    generate("bundle-manifest-deep", b, "manifest.json", "nested too deeply")
    b = bundle("bundle-manifest-no-spectra")
    _manifest(b, lambda m: m.pop("spectra"))
    generate("bundle-manifest-no-spectra", b, "manifest.json", "malformed bundle manifest", "spectra")
    b = bundle("bundle-manifest-fifo")
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")
    generate("bundle-manifest-fifo", b, "manifest.json", "not a regular file")
    return cases


@pytest.fixture(scope="module")
def battery(tmp_path_factory, make_adapter, tiny_base_dir, setup) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("hostile")
    home = root / "home"
    good = clone(make_adapter("hgood", seed=120), root / "adapters" / "hgood")
    wide = clone(make_adapter("hwide", r=80, seed=121), root / "fresh" / "hwide")
    clone(make_adapter("hnew", seed=122), root / "fresh" / "hnew")
    cases = build_cases(root, good, wide, tiny_base_dir, setup)
    spec = {
        "setup": [["ingest", str(good), "--base-model", str(tiny_base_dir)], ["alias", "set", "hgood", "prod", "1"],
                  ["bundle", "create", "hb", "--experts", "hgood", "-o", str(root / "hb-bundle")]],
        "cases": [{k: c[k] for k in ("id", "args", "env")} for c in cases],
        "db": str(home / "registry.db"), "blobs": str(home / "blobs"),
    }
    (root / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "SPECTR_HOME": str(home), "SPECTR_HOSTILE_CASE_SECONDS": str(CASE_SECONDS),
           "SPECTR_CATALOG_CACHE": str(root / "catalog-cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("SPECTR_REGISTRY_URL", None)
    env.pop("SPECTR_BLOB_URL", None)
    runner = Path(__file__).with_name("hostile_runner.py")
    done = subprocess.run([sys.executable, str(runner), str(root / "cases.json"), str(root / "results.jsonl")],
                          capture_output=True, text=True, env=env, cwd=root, preexec_fn=_limits, timeout=1800)
    lines = [json.loads(ln) for ln in (root / "results.jsonl").read_text().splitlines()]
    results = {r["id"]: r for r in lines if "id" in r}
    started = [r["started"] for r in lines if "started" in r]
    return {"cases": {c["id"]: c for c in cases}, "results": results, "started": started, "child": done,
            "root": root, "home": home, "base": tiny_base_dir, "setup_failed": [r for r in lines if "setup_failed" in r]}


# The ids, listed once here so pytest can parametrize before the battery runs (a test checks they match).
CASE_IDS = [
    "config-fifo", "config-dev-zero", "config-over-limit", "config-sparse-10gb", "config-deep", "config-malformed",
    "config-not-object", "rank-5000-digits", "rank-zero", "peft-type-huge", "dora",
    "alpha-inf", "alpha-nan", "alpha-minus-inf", "alpha-1e999", "alpha-string", "alpha-1e308",
    "alpha-pattern-nan", "alpha-pattern-string", "rank-pattern-zero", "rank-pattern-string",
    "rank-pattern-bad-regex", "rank-pattern-catastrophic", "layers-as-string", "layers-mixed",
    "rank-above-width", "weights-fifo", "weights-dev-zero", "weights-sparse-giant", "weights-header-beyond-file",
    "weights-corrupt-secret", "weights-root-only-link", "weights-missing", "weights-nan", "weights-pickle",
    "name-at", "name-comma", "name-bracket", "name-dash", "name-too-long", "name-dot-dot", "path-bracket-markup",
    "path-missing", "base-missing-folder", "base-bare-word", "source-hub-id-offline", "base-hub-id-offline",
    "base-unregistered", "registry-read-only", "bundle-unknown-expert", "bundle-unknown-alias",
    "bundle-unknown-version", "bundle-bad-selector", "bundle-bracket-name", "export-unknown-expert",
    "export-unknown-alias", "bundle-export-unknown", "alias-on-unknown-version", "alias-bad-name",
    "sql-delete", "sql-two-statements", "sql-read-file", "sql-runaway",
    "bundle-file-outside", "bundle-file-dev-zero", "bundle-spectra-link-dev-zero", "bundle-hash-mismatch",
    "bundle-manifest-malformed", "bundle-manifest-deep", "bundle-manifest-no-spectra", "bundle-manifest-fifo",
]


def reason_line(case: dict, stdout: str, stderr: str) -> str:
    """The one line that gives the reason: `rejected SOURCE: ...` for an adapter the ingest refused (stdout,
    with the summary on stderr), `error: ...` on stderr otherwise (and nothing on stdout)."""
    assert "Traceback" not in stdout + stderr
    if case["kind"] == "rejected":
        lines = stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("rejected "), stdout + stderr
        assert stderr.splitlines() == ["1 adapters: 0 new versions, 0 unchanged, 1 rejected"], stderr
        return lines[0]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), stdout + stderr
    return lines[0]


def test_every_case_ran_in_the_child(battery):
    assert not battery["setup_failed"], battery["setup_failed"]
    assert list(battery["cases"]) == CASE_IDS  # the parametrization below covers every built case
    child = battery["child"]
    assert child.returncode == 0, (battery["started"][-1:], child.stderr[-3000:])
    assert set(battery["results"]) == set(CASE_IDS)
    assert len(CASE_IDS) >= 40


@pytest.mark.parametrize("cid", CASE_IDS)
def test_hostile_case(battery, cid):
    case, r = battery["cases"][cid], battery["results"].get(cid)
    assert r is not None, f"{cid} did not finish: the child died in it (over the CPU or memory limit?)" \
        if battery["started"][-1:] == [cid] else f"{cid} never ran"
    assert not r["timed_out"], f"{cid} ran past its {CASE_SECONDS} s bound"
    assert r["crashed"] is None, r["crashed"]
    assert r["code"] not in (0, None) and (case["code"] is None or r["code"] == case["code"]), r
    line = reason_line(case, r["stdout"], r["stderr"])
    for needle in case["needles"]:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert len(line) < 1000, line
    if case["secret"]:
        assert case["secret"] not in r["stdout"] + r["stderr"] and "\\xff" not in line, line
    assert r["changes"] == [], r["changes"]


# ---- a few cases through the installed executable, under the same limits ---------------------------------

EXECUTABLE_CASES = ["config-fifo", "weights-sparse-giant", "registry-read-only", "bundle-file-outside"]


@pytest.mark.parametrize("cid", EXECUTABLE_CASES)
def test_hostile_case_through_the_installed_command(battery, cid):
    case = battery["cases"][cid]
    home = battery["home"]
    db, blobs = home / "registry.db", home / "blobs"
    rows, files = registry_rows(db), blob_files(blobs)
    exe = Path(sys.executable).with_name("spectr")
    env = {**os.environ, "SPECTR_HOME": str(home), "SPECTR_CATALOG_CACHE": str(battery["root"] / "catalog-cache"),
           **case["env"]}
    env.pop("SPECTR_BLOB_URL", None)
    if "SPECTR_REGISTRY_URL" not in case["env"]:
        env.pop("SPECTR_REGISTRY_URL", None)
    done = subprocess.run([str(exe), *case["args"]], capture_output=True, text=True, env=env, cwd=battery["root"],
                          preexec_fn=_limits, timeout=CASE_SECONDS * 3)
    assert done.returncode not in (0, None) and done.returncode > 0, (done.returncode, done.stderr[-2000:])
    line = reason_line(case, done.stdout, done.stderr)
    for needle in case["needles"]:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert changes(db, blobs, rows, files) == []


def test_a_bundle_built_for_another_base_says_so_in_one_line(battery, setup):  # noqa: F811
    """Same shapes, another model: the bundle loads (shapes decide), but a warning names both configs."""
    from typer.testing import CliRunner

    from spectr.cli import app

    other = Path(shutil.copytree(setup["bundle"], battery["root"] / "other-base-bundle"))
    _manifest(other, lambda m: m["base"].update(name="other-org/other-model", config_sha256="f" * 64))
    result = CliRunner().invoke(app, ["generate", "--base-model", str(setup["base"]), "--bundle", str(other),
                                      "--prompt", "w1", "--max-new-tokens", "2", "--no-chat"])
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.stderr.splitlines() if "was built for base" in ln]
    assert len(warned) == 1 and "'other-org/other-model'" in warned[0] and str(setup["base"]) in warned[0], result.stderr
    same = CliRunner().invoke(app, ["generate", "--base-model", str(setup["base"]), "--bundle", str(setup["bundle"]),
                                    "--prompt", "w1", "--max-new-tokens", "2", "--no-chat"])
    assert same.exit_code == 0 and "was built for base" not in same.stderr, same.output
