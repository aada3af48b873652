"""The spectra blob: deterministic safetensors bytes that round-trip."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spectr.registry.spectra_format import FORMAT, blob_sha256, read_metadata, spectra_from_bytes, spectra_to_bytes
from spectr.pipeline.spectra import adapter_spectra
from tests.conftest import build_tiny_llama
from tests.pipeline.test_spectra import base_info, load_peft_folder

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import sys
from tests.conftest import build_tiny_llama
from tests.pipeline.test_spectra import base_info, load_peft_folder
from spectr.pipeline.spectra import adapter_spectra
from spectr.registry.spectra_format import spectra_to_bytes, blob_sha256
from pathlib import Path
ad = load_peft_folder(Path(sys.argv[1]), base_info(build_tiny_llama()))
meta = {"name": "x", "base_model": "tiny", "zeta": "1", "alpha": "2"}
print(blob_sha256(spectra_to_bytes(adapter_spectra(ad, device="cpu"), meta)))
"""


@pytest.fixture(scope="module")
def adapter_dir(make_adapter) -> Path:
    return make_adapter("blob-r4", seed=3)


@pytest.fixture(scope="module")
def spectra(adapter_dir):
    return adapter_spectra(load_peft_folder(adapter_dir, base_info(build_tiny_llama())), device="cpu")


META = {"name": "x", "base_model": "tiny", "zeta": "1", "alpha": "2"}


def test_layout_and_metadata(spectra):
    data = spectra_to_bytes(spectra, META)
    tensors = st_load(data)
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.U"].shape == (64, 4) and tensors[f"{name}.V"].shape == (128, 4)
    assert tensors[f"{name}.S"].shape == (4,)
    assert tensors[f"{name}.scaling"].shape == (1,) and float(tensors[f"{name}.scaling"][0]) == 2.0
    assert tensors[f"{name}.energy"].shape == (1,)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert len(tensors) == 5 * 14
    meta = read_metadata(data)
    assert meta["format"] == FORMAT and meta["method"] == "exact"
    assert json.loads(meta["params"]) == {"rank": None, "dtype": "float64", "device": "cpu"}
    assert meta["zeta"] == "1" and meta["name"] == "x"
    # Header keys are sorted so the bytes cannot depend on hash-map order.
    (n,) = struct.unpack("<Q", data[:8])
    assert list(json.loads(data[8 : 8 + n])["__metadata__"]) == sorted(meta)


@pytest.mark.parametrize("meta", [META, None, {"note": "a \"quoted\" \\ tab\t, line\n, /slash"}])
def test_bytes_are_safetensors_own_with_a_sorted_header(spectra, meta):
    """The direct writer gives exactly what safetensors' writer gives once its header is sorted (blobs written
    before it keep their hashes), escapes in metadata included."""
    from spectr.registry import spectra_format as sf

    reference = sf._canonical_header(st_save(sf._tensors(spectra), metadata=sf._metadata(spectra, meta)))
    assert spectra_to_bytes(spectra, meta) == reference


def test_round_trip_is_bit_identical(spectra):
    data = spectra_to_bytes(spectra, META)
    assert spectra_to_bytes(spectra, META) == data
    back = spectra_from_bytes(data)
    assert back.method == spectra.method and back.params == spectra.params
    for name, m in spectra.modules.items():
        b = back.modules[name]
        assert torch.equal(b.U, m.U) and torch.equal(b.S, m.S) and torch.equal(b.V, m.V)
        assert b.scaling == m.scaling and b.energy == m.energy
    assert spectra_to_bytes(back, META) == data
    assert blob_sha256(data) == blob_sha256(spectra_to_bytes(back, META))
    assert len(blob_sha256(data)) == 64


def test_same_bytes_in_a_fresh_process(spectra, adapter_dir):
    # Another interpreter (other hash seed, other hash-map order) must produce the same blob.
    here = blob_sha256(spectra_to_bytes(spectra, META))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(adapter_dir)], cwd=REPO, capture_output=True, text=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here


def test_different_spectra_different_hash(spectra, make_adapter):
    other = adapter_spectra(load_peft_folder(make_adapter("blob-r4-b", seed=4), base_info(build_tiny_llama())), device="cpu")
    assert blob_sha256(spectra_to_bytes(other)) != blob_sha256(spectra_to_bytes(spectra))


def test_rejects_bad_input(spectra):
    with pytest.raises(ValueError, match="reserved"):
        spectra_to_bytes(spectra, {"format": "mine"})
    with pytest.raises(ValueError, match="format"):
        from safetensors.torch import save

        spectra_from_bytes(save({"a.U": torch.zeros(1)}, metadata={"format": "other"}))
    with pytest.raises(ValueError, match="too short"):
        spectra_from_bytes(b"\x01")
    bad = type(spectra)(modules={"m": type(next(iter(spectra.modules.values())))(
        U=torch.zeros(3, 2), S=torch.zeros(3), V=torch.zeros(4, 3), scaling=1.0)}, method="exact", params={})
    with pytest.raises(ValueError, match=r"module m: U \(3, 2\), S \(3,\), V \(4, 3\)"):
        spectra_to_bytes(bad)
