#!/usr/bin/env bash
# The installed package, as a user gets it: build the wheel, install it (not editable) into a fresh virtualenv
# outside the checkout, then drive the installed `spectr` from a folder where nothing of the checkout is importable:
# migrate, ingest of a tiny generated adapter, catalog, bundle, one routed forward.
# Needs .venv (scripts/setup.sh) for building the wheel and the fixture.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/spectr-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$repo"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/spectr-*.whl)
tops=$(.venv/bin/python -c "import sys, zipfile; print(' '.join(sorted({n.split('/')[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()})))" "$wheel")
case "$tops" in
  "spectr spectr-"*".dist-info") ;;
  *) echo "wheel installs other top-level names: $tops" >&2; exit 1 ;;
esac
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q -c constraints.txt "$wheel"
HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_tiny_fixture.py "$work/fixture" >"$work/fixture.log" 2>&1 \
  || { cat "$work/fixture.log" >&2; exit 1; }

cd "$work"
export SPECTR_HOME="$work/home" PREFECT_HOME="$work/prefect" HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
spectr=venv/bin/spectr
$spectr migrate
$spectr ingest fixture/adapters/tiny-a fixture/adapters/tiny-b --base-model fixture/base --base-name tiny-org/tiny-llama
$spectr catalog --json > catalog.json
$spectr bundle create smoke --all -o bundle
venv/bin/python - <<'PY'
import json

import torch
from transformers import AutoModelForCausalLM

import spectr
from spectr import load_bundle, unload_bundle

assert "site-packages" in spectr.__file__, spectr.__file__
rows = json.load(open("catalog.json"))
assert sorted(r["name"] for r in rows) == ["tiny-a", "tiny-b"], rows
base = AutoModelForCausalLM.from_pretrained("fixture/base").eval()
ids = torch.arange(1, 17).view(1, -1)
with torch.no_grad():
    ref = base(ids).logits
    routed = load_bundle(base, "bundle")(ids).logits
    assert torch.isfinite(routed).all() and not torch.allclose(routed, ref), "routing changed nothing"
    assert torch.equal(unload_bundle(base)(ids).logits, ref)
print(f"wheel smoke test passed: {len(rows)} experts, routed forward max |diff| {float((routed - ref).abs().max()):.3g}")
PY
