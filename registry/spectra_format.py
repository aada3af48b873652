"""The stored spectra blob format (the one owner): deterministic safetensors bytes, "spectr.spectra/1".

Per module: "<module>.U" (out x r), "<module>.S" (r), "<module>.V" (in x r), "<module>.scaling" [1],
"<module>.energy" [1], all float32. Metadata: format, method, params (canonical JSON) + caller keys.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spectr.digest import canonical_json
from spectr.runtime.spectrum import AdapterSpectra, ModuleSpectrum

FORMAT = "spectr.spectra/1"
_PARTS = ("U", "S", "V", "scaling", "energy")
_RESERVED = ("format", "method", "params")


def _canonical_header(data: bytes) -> bytes:
    """safetensors writes __metadata__ in hash-map order; rewrite the header with sorted keys."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = canonical_json(header).encode()
    if len(text) > n:  # cannot happen: same content, compact either way
        raise ValueError(f"blob header grew from {n} to {len(text)} bytes")
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def _tensors(spectra: AdapterSpectra) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, m in spectra.modules.items():
        r = m.S.shape[0]
        if m.U.shape[1] != r or m.V.shape[1] != r:
            raise ValueError(
                f"spectra_to_bytes: module {name}: U {tuple(m.U.shape)}, S {tuple(m.S.shape)}, "
                f"V {tuple(m.V.shape)} disagree on rank"
            )
        tensors[f"{name}.U"] = m.U.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.S"] = m.S.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.V"] = m.V.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.scaling"] = torch.tensor([m.scaling], dtype=torch.float32)
        tensors[f"{name}.energy"] = torch.tensor([m.energy], dtype=torch.float32)
    return tensors


def _metadata(spectra: AdapterSpectra, metadata: dict[str, str] | None) -> dict[str, str]:
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"spectra_to_bytes: metadata keys {clash} are reserved")
    meta = {"format": FORMAT, "method": spectra.method, "params": canonical_json(spectra.params)}
    meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


def spectra_to_bytes(spectra: AdapterSpectra, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize spectra; the same input gives bit-identical bytes.

    The bytes are those of safetensors' own writer with the header's keys sorted (_via_safetensors, kept as
    the reference), laid out here directly: one copy of all tensors' data instead of one numpy round trip
    per tensor and a parse and rewrite of the header. Measured on the 2-core box for a SmolLM2-shaped
    adapter's 1,050 tensors, the safetensors route was ~0.2 s, more than the SVD itself."""
    tensors = _tensors(spectra)
    meta = _metadata(spectra, metadata)
    if sys.byteorder != "little":  # safetensors stores little-endian; let it swap bytes
        return _via_safetensors(tensors, meta)
    names = sorted(tensors)  # safetensors' order for tensors of one dtype
    header: dict = {"__metadata__": meta}
    offset = 0
    for key in names:
        t = tensors[key]
        size = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    # safetensors writes compact JSON (UTF-8, not escaped), padded with spaces to a multiple of 8; the
    # canonical header (sorted, ASCII-escaped) takes that same length, as _canonical_header does.
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    n += -n % 8
    text = canonical_json(header).encode()
    if len(text) > n:  # non-ASCII names grow when escaped: take safetensors' route, which says so
        return _via_safetensors(tensors, meta)
    body = torch.cat([tensors[k].reshape(-1) for k in names]).numpy().tobytes() if names else b""
    return struct.pack("<Q", n) + text + b" " * (n - len(text)) + body


def _via_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return _canonical_header(st_save(tensors, metadata=meta))


def read_metadata(data: bytes) -> dict[str, str]:
    """The blob's __metadata__ without loading tensors."""
    if len(data) < 8:
        raise ValueError(f"spectra blob too short: {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"spectra blob header length {n} exceeds blob size {len(data)}")
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


def spectra_from_bytes(data: bytes) -> AdapterSpectra:
    """Parse a blob written by spectra_to_bytes."""
    meta = read_metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"spectra blob: format {meta.get('format')!r}, expected {FORMAT!r}")
    tensors = st_load(data)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition(".")
        if part not in _PARTS or not name:
            raise ValueError(f"spectra blob: unexpected tensor key {key!r}")
        parts.setdefault(name, {})[part] = t
    modules: dict[str, ModuleSpectrum] = {}
    for name in sorted(parts):
        p = parts[name]
        missing = [x for x in _PARTS if x not in p]
        if missing:
            raise ValueError(f"spectra blob: module {name} lacks {missing}")
        modules[name] = ModuleSpectrum(
            U=p["U"], S=p["S"], V=p["V"], scaling=float(p["scaling"][0]), energy=float(p["energy"][0])
        )
    return AdapterSpectra(modules=modules, method=meta["method"], params=json.loads(meta["params"]))


def blob_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
