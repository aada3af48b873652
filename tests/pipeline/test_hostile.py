"""Hostile adapters: each is refused with one line naming the file, quickly and without reading its bulk.

Every case here once hung, exhausted memory, stored a poisoned adapter or failed with a generic error.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from spectr.pipeline.fetch import fetch
from spectr.pipeline.types import AdapterError
from spectr.pipeline.validate import load_adapter
from tests.pipeline.conftest import clone, edit_config

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture()
def bad(make_adapter, tmp_path) -> Path:
    return clone(make_adapter("plain"), tmp_path / "bad")


def _reject(folder: Path, base, *needles: str) -> str:
    with pytest.raises(AdapterError) as e:
        load_adapter(fetch(str(folder)), base)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _raw_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


# ---- configs that hung, or blew up with a generic error ---------------------------------------------


def test_config_fifo_is_refused_not_waited_on(bad, tiny_base):
    cfg = bad / "adapter_config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    _reject(bad, tiny_base, str(cfg), "not a regular file")


def test_config_linked_to_dev_zero(bad, tiny_base):
    cfg = bad / "adapter_config.json"
    cfg.unlink()
    cfg.symlink_to("/dev/zero")
    _reject(bad, tiny_base, str(cfg), "not a regular file")


def test_config_over_the_size_limit(bad, tiny_base, monkeypatch):
    monkeypatch.setenv("SPECTR_MAX_JSON_BYTES", "256")
    _reject(bad, tiny_base, "adapter_config.json", "over the 256-byte limit", "SPECTR_MAX_JSON_BYTES")


def test_deeply_nested_config(bad, tiny_base):
    _raw_config(bad, '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _reject(bad, tiny_base, "adapter_config.json", "nested too deeply")


def test_rank_of_five_thousand_digits(bad, tiny_base):
    cfg = json.loads((bad / "adapter_config.json").read_text())
    text = json.dumps(cfg).replace(f'"r": {cfg["r"]}', '"r": ' + "9" * 5000)
    _raw_config(bad, text)
    _reject(bad, tiny_base, "adapter_config.json", "invalid JSON")


@pytest.mark.parametrize("alpha", ["Infinity", "NaN", "-Infinity", "1e999", "1" + "0" * 400, '"8"', "true"])
def test_non_finite_or_non_numeric_alpha(bad, tiny_base, alpha):
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = "@@"
    _raw_config(bad, json.dumps(cfg).replace('"@@"', alpha))
    _reject(bad, tiny_base, "adapter_config.json", "lora_alpha must be a finite number")


def test_alpha_whose_scaling_overflows_float32(bad, tiny_base):
    edit_config(bad, lora_alpha=1e308)
    _reject(bad, tiny_base, "adapter_config.json", "not a finite float32")


def test_alpha_that_overflows_with_the_factors(bad, tiny_base):
    from safetensors.torch import load_file

    w = load_file(bad / "adapter_model.safetensors")
    a, b = (float(w[f"base_model.model.{Q0}.lora_{x}.weight"].norm()) for x in "AB")
    assert a * b > 2  # so a scaling of half float32's maximum overflows once applied
    edit_config(bad, lora_alpha=4 * 1.7e38)  # r=4: the scaling itself, 1.7e38, is a finite float32
    _reject(bad, tiny_base, "adapter_config.json", "overflows float32")


@pytest.mark.parametrize("value", ["NaN", '"x"', "1e999"])
def test_alpha_pattern_value_not_finite(bad, tiny_base, value):
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj": "@@"}
    _raw_config(bad, json.dumps(cfg).replace('"@@"', value))
    _reject(bad, tiny_base, "adapter_config.json", "alpha_pattern['q_proj'] must be a finite number")


@pytest.mark.parametrize("value", [0, -4, 2.5, "4", True])
def test_rank_pattern_value_not_a_positive_integer(bad, tiny_base, value):
    edit_config(bad, rank_pattern={"q_proj": value})
    _reject(bad, tiny_base, "adapter_config.json", "rank_pattern['q_proj'] must be a positive integer")


def test_invalid_regex_in_rank_pattern(bad, tiny_base):
    edit_config(bad, rank_pattern={"q_proj(": 4})
    _reject(bad, tiny_base, "adapter_config.json", "rank_pattern key", "is not a valid regex")


def test_catastrophic_regex_in_rank_pattern_returns(bad, tiny_base):
    # Once a backtracking hang that ignored SIGTERM; now matched with a time bound (and it simply fails to match).
    edit_config(bad, rank_pattern={"(.*.*)*Z": 8}, alpha_pattern={"(a|aa)+$": 4})
    ad = load_adapter(fetch(str(bad)), tiny_base)
    assert ad.modules[Q0].A.shape[0] == 4


def test_pattern_that_times_out_is_refused(bad, tiny_base, monkeypatch):
    import spectr.pipeline.validate as validate

    def slow(*_a, **_k):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(validate.regex, "match", slow)
    edit_config(bad, rank_pattern={"q_proj": 4})
    _reject(bad, tiny_base, "adapter_config.json", "rank_pattern key 'q_proj' took over", "simplify the pattern")


@pytest.mark.parametrize("layers", ["0", [0, "1"], 1.5, {"0": 1}])
def test_layers_to_transform_of_the_wrong_type(bad, tiny_base, layers):
    edit_config(bad, layers_to_transform=layers)
    _reject(bad, tiny_base, "adapter_config.json", "layers_to_transform must be an integer or a list of integers")


def test_peft_type_echo_is_bounded(bad, tiny_base):
    edit_config(bad, peft_type="X" * 100_000)
    msg = _reject(bad, tiny_base, "adapter_config.json", "only LORA adapters")
    assert len(msg) < 500


# ---- weights ---------------------------------------------------------------------------------------


def test_rank_above_the_module_width(make_adapter, tiny_base):
    wide = make_adapter("wide", r=80)  # the tiny Llama's hidden size is 64
    _reject(wide, tiny_base, "adapter_model.safetensors", "rank 80 exceeds min(d_in, d_out) = 64")


def test_weights_fifo_is_refused(bad, tiny_base):
    w = bad / "adapter_model.safetensors"
    w.unlink()
    os.mkfifo(w)
    _reject(bad, tiny_base, str(w), "not a regular file")


def _sparse_giant(folder: Path, rows: int, cols: int) -> Path:
    """A safetensors file whose header claims a (rows, cols) fp32 lora_A for q_proj: sparse, a few KB on disk."""
    w = folder / "adapter_model.safetensors"
    keys = {f"base_model.model.{Q0}.lora_A.weight": [rows, cols], f"base_model.model.{Q0}.lora_B.weight": [64, rows]}
    header, offset = {}, 0
    for key, shape in keys.items():
        n = shape[0] * shape[1] * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(w, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: nothing is written
    edit_config(folder, r=rows, target_modules=["q_proj"])
    return w


def test_sparse_header_claiming_gigabytes_is_refused_before_reading(bad, tiny_base_dir, tmp_path):
    w = _sparse_giant(bad, 12_000, 64 * 1000)  # ~3 GB of float32 claimed, rows x cols != the base's q_proj
    assert w.stat().st_size > 3e9 and os.stat(w).st_blocks * 512 < 1e6
    code = (
        "import resource, sys\n"
        "from spectr.pipeline.basemodel import resolve_base_model\n"
        "from spectr.pipeline.fetch import fetch\n"
        "from spectr.pipeline.types import AdapterError\n"
        "from spectr.pipeline.validate import load_adapter\n"
        "base = resolve_base_model(sys.argv[2])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_adapter(fetch(sys.argv[1]), base)\n"
        "except AdapterError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bad), str(tiny_base_dir)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    assert "do not fit base" in out[0] and str(w) in out[0]
    assert int(out[1]) < 200_000  # KiB: the claimed 3 GB were never read


def test_weights_that_do_not_parse_echo_no_bytes(bad, tiny_base):
    w = bad / "adapter_model.safetensors"
    secret = b"\xffSECRET!"
    w.write_bytes(struct.pack("<Q", 8) + secret)
    msg = _reject(bad, tiny_base, str(w), "corrupt safetensors header")
    assert "SECRET" not in msg and "\\xff" not in msg


# ---- the hub -----------------------------------------------------------------------------------------


def test_hub_endpoint_that_never_answers_times_out(monkeypatch):
    """An endpoint that accepts connections and never answers once hung ingest forever (ignoring SIGTERM)."""
    import socket
    import threading

    import huggingface_hub.constants as hc

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("SPECTR_HUB_TIMEOUT", "2")
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("err", pytest.raises(AdapterError, fetch, "org/silent")))
    worker.start()
    worker.join(120)
    server.close()
    assert not worker.is_alive(), "fetch did not return"
    assert held, "the fake endpoint was never contacted"
    msg = str(box["err"].value)
    assert msg.startswith("org/silent: the Hugging Face Hub did not answer within 2 s") and "\n" not in msg


# ---- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["a@b", "a,b", "-dash", "x[red]", "é"])
def test_expert_names_that_could_not_be_selected_are_refused(make_adapter, tmp_path, folder):
    odd = clone(make_adapter("plain"), tmp_path / folder)
    with pytest.raises(AdapterError, match=r"expert name .* use 1-128 letters, digits"):
        fetch(str(odd))


def test_dot_dot_is_not_an_expert_name(make_adapter, tmp_path):
    clone(make_adapter("plain"), tmp_path / "inner")
    with pytest.raises(AdapterError, match=r"expert name '\.\.'"):
        fetch(str(tmp_path / "inner" / ".."))


def test_the_registry_refuses_a_bad_name_from_any_caller(spectr_home):
    from spectr.registry import Registry
    from tests.registry.conftest import loaded

    reg = Registry()
    try:
        with pytest.raises(ValueError, match="expert name 'a@b'"):
            reg.add_version(loaded("a@b", "1"), "0" * 64, method="exact", params={}, energy=1.0, n_modules=1,
                            size_bytes=1)
        assert reg.versions() == []
    finally:
        reg.close()


def test_an_unexpected_error_is_one_line_even_when_it_has_no_message():
    from spectr.pipeline.types import failure_reason

    assert failure_reason(RuntimeError()) == "RuntimeError (no message); rerun with --debug for the traceback"
    assert failure_reason(OSError("disk\nfull")) == "OSError: disk"
    assert failure_reason(MemoryError()).startswith("out of memory while reading or decomposing it")
