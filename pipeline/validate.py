"""Validate a PEFT LoRA adapter folder against a base model and load its factors as float32.

Safetensors only: the header is parsed and checked here before safetensors reads a byte of data,
and pickle files are refused without being opened.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

import regex
import torch
from safetensors import safe_open

from spectr.pipeline.basemodel import names_match
from spectr.pipeline.files import (
    CONFIG_FILE, WEIGHTS_FILE, adapter_content_sha256, read_adapter_config, weights_file as _weights_file,
)
from spectr.pipeline.types import AdapterError, AdapterSource, BaseModelInfo, LoadedAdapter, ModuleFactors

MAX_HEADER_BYTES = 100 * 1024 * 1024
KEY_PREFIX = "base_model.model."
PATTERN_TIMEOUT_S = 1.0  # rank_pattern/alpha_pattern keys are user regexes: matching them is time-bounded
_F32_MAX = float(torch.finfo(torch.float32).max)

# bytes per element of every dtype the safetensors format defines
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# Config keys that turn plain LoRA into something whose delta is not scaling * B @ A.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adds magnitude vectors",
    "use_qalora": "QALoRA (use_qalora) pools the input",
    "layer_replication": "layer_replication changes the layer stack",
    "target_parameters": "target_parameters adapts raw parameters, not modules",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) activates only after invocation tokens",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "kasa_config": "KaSA (kasa_config) changes the base weight and adds singular values",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples the factors",
}

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B)\.(?P<param>weight|bias)$")
_OTHER_LORA = re.compile(r"\.(lora_magnitude_vector|lora_embedding_[AB]|lora_[A-Za-z]+)(\.|$)")
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check_patterns(cfg: dict, file: Path) -> None:
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(key)
        if patterns in (None, {}):
            continue
        if not isinstance(patterns, dict):
            raise AdapterError(f"{file}: {key} must be an object of regex -> value, got {type(patterns).__name__}")
        for pattern, value in patterns.items():
            try:
                regex.compile(pattern)
            except (regex.error, RecursionError, OverflowError) as e:
                raise AdapterError(f"{file}: {key} key {pattern[:80]!r} is not a valid regex: {e}") from None
            if positive_int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise AdapterError(f"{file}: {key}[{pattern[:80]!r}] must be a positive integer, got {value!r}")
            if not positive_int and not _is_finite_number(value):
                raise AdapterError(f"{file}: {key}[{pattern[:80]!r}] must be a finite number, got {value!r}")


def _check_config(cfg: dict, file: Path) -> None:
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{file}: peft_type is {str(peft_type)[:80]!r}, only LORA adapters are supported")
    for key, why in _UNSUPPORTED.items():
        if _is_set(cfg.get(key)):
            raise AdapterError(f"{file}: unsupported LoRA variant: {why} ({key}={str(cfg.get(key))[:80]})")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{file}: r must be a positive integer, got {str(r)[:80]}")
    alpha = cfg.get("lora_alpha", r)
    if not _is_finite_number(alpha):
        raise AdapterError(f"{file}: lora_alpha must be a finite number, got {str(alpha)[:80]}")
    _check_patterns(cfg, file)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise AdapterError(f"{file}: layers_to_transform must be an integer or a list of integers, "
                           f"got {str(layers)[:80]}")


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """Parse and check a safetensors header without trusting it (a regular file; length, JSON, dtypes, offsets)."""
    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"{file}: not a regular file")
        with open(file, "rb") as f:
            raw = _read_header(f, file, st.st_size)
    except OSError as e:  # no bytes of the file in the message: it may not be the user's to read
        raise AdapterError(f"{file}: cannot read the weights: {e.strerror or type(e).__name__}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise AdapterError(f"{file}: corrupt safetensors header (not valid UTF-8 JSON)") from None
    return _check_header(header, file, st.st_size - 8 - len(raw))


def _read_header(f: Any, file: Path, size: int) -> bytes:
    head = f.read(8)
    if len(head) < 8:
        raise AdapterError(f"{file}: truncated safetensors file ({size} bytes, no header length)")
    (n,) = struct.unpack("<Q", head)
    # The length is the file's first 8 bytes: it is not echoed (the file may not be the user's to read).
    if n > MAX_HEADER_BYTES:
        raise AdapterError(f"{file}: not a safetensors file: its header length exceeds the {MAX_HEADER_BYTES}-byte "
                           "limit")
    if 8 + n > size:
        raise AdapterError(f"{file}: truncated or not a safetensors file: its header length exceeds the file's "
                           f"{size} bytes")
    return f.read(n)


def _check_header(header: Any, file: Path, data_len: int) -> dict[str, dict]:
    if not isinstance(header, dict):
        raise AdapterError(f"{file}: corrupt safetensors header: not a JSON object")
    tensors: dict[str, dict] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise AdapterError(f"{file}: corrupt safetensors header entry {key}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise AdapterError(f"{file}: tensor {key} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise AdapterError(f"{file}: tensor {key} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterError(f"{file}: tensor {key} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise AdapterError(
                f"{file}: tensor {key} offsets [{begin}, {end}] lie outside the {data_len}-byte data section"
            )
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise AdapterError(
                f"{file}: tensor {key} {dtype} {tuple(shape)} needs {math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, "
                f"offsets give {end - begin}"
            )
        tensors[key] = info
    return tensors


def _pattern_value(patterns: dict | None, module: str, default: Any, file: Path, what: str) -> Any:
    # PEFT's own rule (peft.utils.other.get_pattern_key): the first key k with re.match(rf"(.*\.)?({k})$", module).
    # The keys come from the user, so they are matched with a time bound (no catastrophic backtracking hang).
    for key, value in (patterns or {}).items():
        try:
            hit = regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise AdapterError(f"{file}: {what} key {key[:80]!r} took over {PATTERN_TIMEOUT_S:g} s to match "
                               f"module {module}; simplify the pattern") from None
        if hit:
            return value
    return default


def _is_saved_module(module: str, names: list[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def _classify(keys: list[str], cfg: dict, file: Path) -> tuple[dict[str, dict[str, str]], bool]:
    """Split checkpoint keys into LoRA parts per module; reject anything unknown. Also: any base bias?"""
    saved_names = list(cfg.get("modules_to_save") or [])
    bias_mode = cfg.get("bias") or "none"
    lora: dict[str, dict[str, str]] = {}
    has_bias = False
    for key in keys:
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{file}: unknown weight key {key} (expected the {KEY_PREFIX} prefix)")
        name = key[len(KEY_PREFIX):]
        m = _LORA_KEY.match(name)
        if m:
            lora.setdefault(m["mod"], {})[f"{m['kind']}.{m['param']}"] = key
            continue
        other = _OTHER_LORA.search(name)
        if other:
            part = other.group(1)
            why = {
                "lora_magnitude_vector": "DoRA magnitude vector",
                "lora_embedding_A": "embedding LoRA",
                "lora_embedding_B": "embedding LoRA",
            }.get(part, "unknown LoRA weight")
            raise AdapterError(f"{file}: unsupported weight {key} ({why})")
        owner = name.rsplit(".", 1)[0]
        if saved_names and _is_saved_module(owner, saved_names):
            continue
        if bias_mode in ("all", "lora_only") and name.endswith(".bias"):
            has_bias = True  # base-module biases trained alongside; not part of the low-rank delta
            continue
        raise AdapterError(f"{file}: unknown weight key {key}")
    return lora, has_bias


def _load_tensor(f: Any, key: str, file: Path, module: str) -> torch.Tensor:
    t = f.get_tensor(key).to(torch.float32)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise AdapterError(f"{file}: module {module}: {key} {tuple(t.shape)} holds {bad} NaN/Inf values")
    return t


def load_adapter(
    src: AdapterSource, base: BaseModelInfo, *, config: dict | None = None, content_sha256: str | None = None
) -> LoadedAdapter:
    """Validate src against base and return its factors (float32, oriented y = W x); AdapterError if bad.

    config / content_sha256: adapter_config.json and the content hash when the caller has read them already.
    """
    folder = Path(src.path)
    cfg_file = folder / CONFIG_FILE
    cfg = read_adapter_config(folder) if config is None else config
    _check_config(cfg, cfg_file)
    file = _weights_file(folder)
    header = read_safetensors_header(file)
    lora, has_bias = _classify(sorted(header), cfg, file)
    if not lora:
        raise AdapterError(f"{file}: no LoRA weights (no lora_A/lora_B keys)")
    for module, parts in sorted(lora.items()):
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            have, miss = ("lora_A", "lora_B") if "lora_A.weight" in parts else ("lora_B", "lora_A")
            raise AdapterError(f"{file}: module {module}: {have} without its {miss}")
        if "lora_A.bias" in parts:
            raise AdapterError(f"{file}: module {module}: unknown weight key {parts['lora_A.bias']}")
    # Routing applies scaling * U diag(S) V^T per expert and nothing else: a trained bias would be loaded and
    # then silently dropped, so such adapters are refused rather than served as something they are not.
    biased = sorted(m for m, parts in lora.items() if "lora_B.bias" in parts)
    if biased:
        raise AdapterError(f"{file}: lora_bias: module {biased[0]} (and {len(biased) - 1} more) trains a bias on "
                           "lora_B, which spectral routing cannot apply; retrain with lora_bias=False")
    if has_bias:
        raise AdapterError(f"{file}: bias={cfg.get('bias')!r}: the adapter trains base-module biases, which "
                           "spectral routing cannot apply; retrain with bias='none'")

    r_default, alpha_default = int(cfg["r"]), float(cfg.get("lora_alpha", 8))  # PEFT's default alpha
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    adapter_base = cfg.get("base_model_name_or_path") or ""
    trained_on = adapter_base or "an unnamed base"
    order = {name: i for i, name in enumerate(base.modules)}  # report the earliest layer first
    ordered = sorted(lora.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    # Every check that the header can answer comes before a byte of tensor data is read, so a header
    # that claims gigabytes (a sparse file) is refused at the size the base model allows.
    scalings: dict[str, float] = {}
    for module, parts in ordered:
        a, b = header[parts["lora_A.weight"]]["shape"], header[parts["lora_B.weight"]]["shape"]
        for key in parts.values():
            if header[key]["dtype"] not in _FLOAT_DTYPES:
                raise AdapterError(f"{file}: module {module}: {key} has non-float dtype {header[key]['dtype']}")
        if len(a) != 2 or len(b) != 2:
            raise AdapterError(f"{file}: module {module}: lora_A {tuple(a)} / lora_B {tuple(b)} are not 2-D "
                               f"(only linear-module LoRA is supported)")
        r = _pattern_value(cfg.get("rank_pattern"), module, r_default, cfg_file, "rank_pattern")
        if a[0] != r or b[1] != r:
            raise AdapterError(f"{file}: module {module}: lora_A {tuple(a)} / lora_B {tuple(b)} disagree with "
                               f"the config's rank r={r}")
    for module, parts in ordered:
        a, b = header[parts["lora_A.weight"]]["shape"], header[parts["lora_B.weight"]]["shape"]
        shape = base.modules.get(module)
        if shape is None:
            raise AdapterError(f"{file}: module {module} is not a linear module of base model {base.name} "
                               f"(adapter trained on {trained_on})")
        r = a[0]
        bias_shape = header[parts["lora_B.bias"]]["shape"] if "lora_B.bias" in parts else None
        if tuple(a) != (r, shape.in_features) or tuple(b) != (shape.out_features, r) or (
            bias_shape is not None and tuple(bias_shape) != (shape.out_features,)
        ):
            raise AdapterError(
                f"{file}: module {module}: lora_A {tuple(a)} / lora_B {tuple(b)} do not fit base "
                f"{base.name} ({shape.in_features} -> {shape.out_features}, needs A ({r}, {shape.in_features}) "
                f"and B ({shape.out_features}, {r})); adapter trained on {trained_on}"
            )
        if r > min(shape.in_features, shape.out_features):
            raise AdapterError(f"{file}: module {module}: rank {r} exceeds min(d_in, d_out) = "
                               f"{min(shape.in_features, shape.out_features)} of base {base.name}; lower r")
        if layers:
            idx = _LAYER_INDEX.search(module)
            if idx is None or int(idx.group(1)) not in layers:
                raise AdapterError(f"{file}: module {module} is outside layers_to_transform {layers}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha_default, cfg_file, "alpha_pattern"))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if not math.isfinite(scaling) or abs(scaling) >= _F32_MAX:
            raise AdapterError(f"{cfg_file}: module {module}: scaling {scaling:g} (lora_alpha {alpha:g}, r {r}) "
                               f"is not a finite float32")
        scalings[module] = scaling

    modules: dict[str, ModuleFactors] = {}
    try:
        f = safe_open(str(file), framework="pt")
    except Exception as e:  # the header passed our checks, but safetensors may still object
        raise AdapterError(f"{file}: safetensors cannot open it: {str(e).splitlines()[0][:200]}") from None
    with f:
        for module, parts in ordered:
            A = _load_tensor(f, parts["lora_A.weight"], file, module)
            B = _load_tensor(f, parts["lora_B.weight"], file, module)
            bias = _load_tensor(f, parts["lora_B.bias"], file, module) if "lora_B.bias" in parts else None
            # ||scaling * B @ A||_2 <= |scaling| ||B||_F ||A||_F: bounded, so the spectra stay finite in float32.
            bound = abs(scalings[module]) * float(A.norm()) * float(B.norm())
            if not math.isfinite(bound) or bound >= _F32_MAX:
                raise AdapterError(f"{cfg_file}: module {module}: scaling {scalings[module]:g} times the factors' "
                                   f"norms overflows float32; check lora_alpha")
            modules[module] = ModuleFactors(name=module, A=A, B=B, scaling=scalings[module], bias=bias)

    warnings: list[str] = []
    if not adapter_base:
        warnings.append(f"{cfg_file}: base_model_name_or_path is empty; shapes match base {base.name}")
    elif not names_match(adapter_base, base.name):
        warnings.append(
            f"{cfg_file}: adapter names base {adapter_base} but is loaded on {base.name}; "
            f"architecture and all {len(modules)} module shapes match"
        )
    saved = sorted(cfg.get("modules_to_save") or [])
    if saved:
        warnings.append(f"modules_to_save {saved}: kept in the record, not routed")
    return LoadedAdapter(
        source=src,
        config=cfg,
        base=base,
        modules=modules,
        content_sha256=content_sha256 or adapter_content_sha256(folder, cfg),
        rank=r_default,
        alpha=alpha_default,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        modules_to_save=saved,
        warnings=warnings,
    )
