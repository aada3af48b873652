"""Expert bundles: a folder with manifest.json and spectra.safetensors; loading one into a model.

Layout of spectra.safetensors, per targeted module m (experts in manifest order, ranks zero-padded to
the module's largest rank r; see runtime/routing.py):
  "{m}.Vt" (E*r, d_in) float32    "{m}.U" (d_out, E*r) float32    "{m}.S" (E, r) float32
  "{m}.scaling" (E,) float32      "{m}.rank" (E,) int64
An expert that does not adapt m has rank 0 there: all-zero rows/columns, never selected by a router.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from spectr.digest import config_sha256
from spectr.runtime.layer import ForwardState, RoutedLinear, RouterConfig, release_group
from spectr.runtime.presets import DEFAULT_PRESET, preset_settings
from spectr.runtime.trace import TraceRecorder

if TYPE_CHECKING:  # only for type hints
    from spectr.runtime.spectrum import AdapterSpectra

FORMAT = "spectr-bundle/1"
MANIFEST = "manifest.json"
SPECTRA = "spectra.safetensors"
FIELDS = ("Vt", "U", "S", "scaling", "rank")


@dataclass
class Bundle:
    """A read bundle: its manifest and the stacked tensors."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def expert_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["experts"]]

    @property
    def modules(self) -> dict[str, dict[str, int]]:
        return self.manifest["modules"]

    def bank(self, module: str) -> dict[str, torch.Tensor]:
        return {f: self.tensors[f"{module}.{f}"] for f in FIELDS}


def _stack_module(module: str, shape: list[int], experts: list[tuple[dict, Any]]) -> dict[str, torch.Tensor]:
    d_in, d_out = shape
    spectra = [sp.modules.get(module) for _, sp in experts]
    E, r = len(experts), max(ms.S.numel() for ms in spectra if ms is not None)
    Vt, U = torch.zeros(E, r, d_in), torch.zeros(d_out, E, r)
    S, scaling, rank = torch.zeros(E, r), torch.zeros(E), torch.zeros(E, dtype=torch.int64)
    for e, ms in enumerate(spectra):
        if ms is None:
            continue
        k = ms.S.numel()
        if tuple(ms.U.shape) != (d_out, k) or tuple(ms.V.shape) != (d_in, k):
            raise ValueError(
                f"bundle: expert {experts[e][0]['name']!r} module {module}: U {tuple(ms.U.shape)}, "
                f"V {tuple(ms.V.shape)} do not fit the base's [in={d_in}, out={d_out}] at rank {k}"
            )
        order = torch.argsort(ms.S.float(), descending=True)  # Arrow's v_1 is column 0
        Vt[e, :k] = ms.V.float()[:, order].T
        U[:, e, :k] = ms.U.float()[:, order]
        S[e, :k] = ms.S.float()[order]
        scaling[e], rank[e] = float(ms.scaling), k
    return {
        f"{module}.Vt": Vt.reshape(E * r, d_in),
        f"{module}.U": U.reshape(d_out, E * r),
        f"{module}.S": S,
        f"{module}.scaling": scaling,
        f"{module}.rank": rank,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_bundle(
    path: Path, *, base: dict, experts: list[tuple[dict, AdapterSpectra]], router: dict | None = None
) -> Path:
    """Write <path>/spectra.safetensors and <path>/manifest.json (deterministic bytes); return path.

    base: {"name", "architecture", "model_type", "config_sha256", "modules": {module: [in, out]}};
    experts: (info, spectra) pairs, info with at least "name", "version", "content_sha256", "rank", "alpha";
    router: the bundle's suggested router options (RouterConfig fields), recorded in the manifest when given.
    Everything is checked before anything is written.
    """
    path = Path(path)
    files = bundle_files(base=base, experts=experts, router=router, where=f"bundle {path}")
    path.mkdir(parents=True, exist_ok=True)
    for name in (SPECTRA, MANIFEST):  # the manifest last: it names the spectra file's hash
        _write_atomic(path / name, files[name])
    return path


def bundle_files(
    *, base: dict, experts: list[tuple[dict, AdapterSpectra]], router: dict | None = None, where: str = "bundle"
) -> dict[str, bytes]:
    """The bytes of a bundle's two files, {SPECTRA: ..., MANIFEST: ...}; the same input gives the same bytes."""
    if not experts:
        raise ValueError(f"{where}: no experts given")
    names = [info["name"] for info, _ in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: expert names repeat: {names}")
    shapes = base["modules"]
    used = sorted({m for _, sp in experts for m in sp.modules})
    for info, sp in experts:
        for m in sp.modules:
            if m not in shapes:
                raise ValueError(f"{where}: expert {info['name']!r} adapts {m}, which base {base['name']!r} lacks")
    tensors: dict[str, torch.Tensor] = {}
    for m in used:
        tensors.update(_stack_module(m, list(shapes[m]), experts))
    data = st_save(tensors)
    manifest = {
        "format": FORMAT,
        "base": {**base, "modules": {m: list(shapes[m]) for m in sorted(shapes)}},
        "experts": [dict(info) for info, _ in experts],
        "modules": {
            m: {"in": shapes[m][0], "out": shapes[m][1], "rank": int(tensors[f"{m}.S"].shape[1])} for m in used
        },
        "spectra": {"file": SPECTRA, "sha256": hashlib.sha256(data).hexdigest()},
    }
    if router:
        manifest["router"] = dict(router)
    return {SPECTRA: data, MANIFEST: (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}


MAX_MANIFEST_BYTES = 64 << 20


def _read_inside(folder: Path, name: Any, limit: int) -> bytes:
    """A bundle's file: a plain name inside the bundle folder, a regular file, at most `limit` bytes
    (a manifest naming ../../etc/passwd or /dev/zero is refused before anything is read)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{folder / MANIFEST}: bundle file name {str(name)[:80]!r} is not a plain file name "
                         "inside the bundle folder")
    file = folder / name
    st = file.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{file}: not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{file}: {st.st_size} bytes, more than the {limit} its manifest allows")
    with open(file, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{file}: more than the {limit} bytes its manifest allows")
    return data


def _spectra_bytes_bound(manifest: dict) -> int:
    """The most bytes the spectra file can need: every stacked tensor at 8 bytes an element, plus headers."""
    E = len(manifest["experts"])
    elements = sum(E * int(i["rank"]) * (int(i["in"]) + int(i["out"]) + 1) + 2 * E
                   for i in manifest["modules"].values())
    return 8 * elements + 1024 * (len(manifest["modules"]) + 16)


def read_bundle(path: Path | str) -> Bundle:
    """Read a bundle folder; the spectra file must match the sha256 its manifest records."""
    path = Path(path)
    raw = _read_inside(path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise ValueError(f"{path / MANIFEST}: not a bundle manifest (invalid JSON: {why})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path / MANIFEST}: format {str(got)[:80]!r}, expected {FORMAT!r}")
    try:  # a hand-edited manifest: missing keys or wrong types are the manifest's fault, said so in one line
        spectra_file, bound = manifest["spectra"]["file"], _spectra_bytes_bound(manifest)
        want_sha = str(manifest["spectra"]["sha256"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path / MANIFEST}: malformed bundle manifest ({type(e).__name__}: {str(e)[:120]}); "
                         "write the bundle again with `spectr bundle create` or `spectr bundle export`") from None
    data = _read_inside(path, spectra_file, bound)
    digest = hashlib.sha256(data).hexdigest()
    if digest != want_sha:
        raise ValueError(f"{path / SPECTRA}: sha256 {digest[:12]} does not match the manifest's {want_sha[:12]}")
    tensors = st_load(data)
    E = len(manifest["experts"])
    for m, info in manifest["modules"].items():
        r = info["rank"]
        want = {"Vt": (E * r, info["in"]), "U": (info["out"], E * r), "S": (E, r), "scaling": (E,), "rank": (E,)}
        for f, shape in want.items():
            got = tuple(tensors[f"{m}.{f}"].shape) if f"{m}.{f}" in tensors else None
            if got != shape:
                raise ValueError(f"{path / SPECTRA}: tensor {m}.{f} has shape {got}, manifest implies {shape}")
    return Bundle(path=path, manifest=manifest, tensors=tensors)


def module_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like module: nn.Linear, or GPT-2 Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def _check_shapes(model: nn.Module, bundle: Bundle) -> None:
    """Refuse, before anything is wrapped, a bundle whose modules the model lacks or shapes differently."""
    problems = []
    for m, info in bundle.modules.items():
        try:
            sub = model.get_submodule(m)
        except AttributeError:
            problems.append(f"module {m} is missing from the model")
            continue
        got, want = module_shape(sub), (info["in"], info["out"])
        if got != want:
            what = type(sub).__name__ if got is None else f"[in={got[0]}, out={got[1]}]"
            problems.append(f"module {m}: model has {what}, bundle expects [in={want[0]}, out={want[1]}]")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"bundle {bundle.path} does not fit {type(model).__name__}: {problems[0]}{more}")


@dataclass
class RoutedState:
    """What load_bundle attached to a model (as model.spectr)."""

    bundle: Bundle
    config: RouterConfig
    recorder: TraceRecorder
    modules: list[str]
    forward: ForwardState | None = None  # shared by the routed modules: pooling and smoothing state
    hooks: list[Any] = field(default_factory=list)  # the model hooks that begin/end each forward
    generation: dict[str, Any] | None = None  # generation_config fields compile=True replaced (restored on unload)


def _expert_index(bundle: Bundle, expert: int | str | None) -> int | None:
    if expert is None or isinstance(expert, int):
        return expert
    if expert not in bundle.expert_names:
        raise ValueError(f"bundle {bundle.path}: no expert named {expert!r}; it has {bundle.expert_names}")
    return bundle.expert_names.index(expert)


def load_bundle(
    model: nn.Module,
    bundle: Bundle | Path | str,
    preset: str = DEFAULT_PRESET,
    *,
    compile: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Wrap the bundle's modules of `model` with routed linears (in place) and return the model.

    preset: a name in runtime.presets.PRESETS ("default", "reference", "peft-arrow", "uniform", "fixed", ...);
    overrides are RouterConfig fields (router, top_k, expert, weighting, temperature, combine, score,
    rank_normalize, apply, pool, smooth, impl). top_k is clipped to the bundle's number of experts. Pooling and
    smoothing read attention_mask (2-D, by keyword) and the cache from the model's forward call; they reset at
    each forward without a cache (a new prompt).

    compile=True makes generate() use a static KV cache, with which transformers compiles each decode
    step (torch.compile, fullgraph=True, CUDA graphs on a GPU). For your own forward calls, the recipe is
    torch.compile(model, mode="reduce-overhead", fullgraph=True) (the routed path has no graph breaks).
    """
    if getattr(model, "spectr", None) is not None:
        raise ValueError("model already has a bundle loaded; call unload_bundle(model) first")
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    settings = preset_settings(preset, len(bundle.expert_names), **overrides)
    cfg = RouterConfig(**{**settings, "expert": _expert_index(bundle, settings.get("expert"))})
    cfg.validate()
    _check_shapes(model, bundle)
    _warn_other_base(model, bundle)
    recorder = TraceRecorder(expert_names=list(bundle.expert_names))
    forward = ForwardState(cfg)
    for m in bundle.modules:
        base = model.get_submodule(m)
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent), child,
                RoutedLinear(base, m, module_bank(bundle, m, base.weight), cfg, recorder, forward))
    forward.link()
    hooks = []
    body = getattr(model, getattr(model, "base_model_prefix", "") or "_no_body", None)
    for entry in (model, body) if isinstance(body, nn.Module) and body is not model else (model,):
        hooks += [entry.register_forward_pre_hook(forward.begin, with_kwargs=True),
                  entry.register_forward_hook(forward.end, always_call=True)]
    generation = _compile_generation(model) if compile else None
    model.spectr = RoutedState(bundle=bundle, config=cfg, recorder=recorder, modules=list(bundle.modules),
                               forward=forward, hooks=hooks, generation=generation)
    return model


def module_bank(bundle: Bundle, module: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module's stacked spectra in the dtype and on the device of `like` (its base weight; ranks stay int)."""
    return {f: (t if f == "rank" else t.to(like.dtype)).to(like.device) for f, t in bundle.bank(module).items()}


def _compile_generation(model: nn.Module) -> dict[str, Any]:
    """Static cache + fullgraph compile config for generate(); returns the fields it replaced."""
    from transformers import CompileConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        raise ValueError(f"load_bundle(compile=True): {type(model).__name__} has no generation_config; "
                         "compile it yourself: torch.compile(model, mode='reduce-overhead', fullgraph=True)")
    old = {"cache_implementation": gen.cache_implementation, "compile_config": gen.compile_config}
    gen.cache_implementation = "static"
    gen.compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    return old


class OtherBaseWarning(UserWarning):
    """The model differs from the base a bundle was built for, though every module shape matches."""


def _warn_other_base(model: nn.Module, bundle: Bundle) -> None:
    """Shapes decide whether a bundle fits; a base of another architecture, model type or config (another
    fine-tune of the same shapes, another rope or vocabulary) is allowed, but never silently."""
    want = bundle.manifest.get("base", {})
    config = getattr(model, "config", None)
    have = {"architecture": type(model).__name__, "model_type": getattr(config, "model_type", None)}
    differ = [f"{k} {want[k]!r} vs {v!r}" for k, v in have.items() if want.get(k) and v and want[k] != v]
    where, digest = _config_file_sha256(config)
    recorded = want.get("config_sha256")
    if not differ and isinstance(recorded, str) and digest is not None and digest != recorded:
        differ = [f"config sha256 {recorded[:12]} vs {digest[:12]} of {where}"]
    if differ:
        warnings.warn(f"{bundle.path}: bundle was built for base {str(want.get('name'))[:120]!r}; this model differs "
                      f"({'; '.join(differ)}) though all module shapes match: the experts were trained on another "
                      "model", OtherBaseWarning, stacklevel=3)


def _config_file_sha256(config: Any) -> tuple[str | None, str | None]:
    """(file, digest) of the config.json the model was loaded from, hashed as bundles record it; (None, None)
    when it cannot be found offline (a model built in memory, a hub id not in the local cache)."""
    source = str(getattr(config, "_name_or_path", "") or "")
    if not source:
        return None, None
    file = Path(source).expanduser() / "config.json"
    if not file.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "config.json", local_files_only=True,
                                _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except Exception:  # not a hub id, or not cached: nothing to compare with, and nothing is downloaded
            return None, None
        if not found:
            return None, None
        file = Path(found)
    try:
        if file.stat().st_size > 1 << 20:  # a config is a few KB; never read a huge or special file here
            return None, None
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None, None
    return (str(file.parent), config_sha256(loaded)) if isinstance(loaded, dict) else (None, None)


def set_router(model: nn.Module, preset: str | None = None, **changes: Any) -> RouterConfig:
    """Change the routing of a loaded model in place: a whole preset (plus changes), or single settings
    (router, top_k, expert, weighting, ...) on top of the current ones."""
    state: RoutedState = model.spectr
    if preset is not None:
        changes = preset_settings(preset, len(state.bundle.expert_names), **changes)
    if "expert" in changes:
        changes["expert"] = _expert_index(state.bundle, changes["expert"])
    new = RouterConfig(**{**vars(state.config), **changes})
    new.validate()
    for k, v in vars(new).items():
        setattr(state.config, k, v)
    if new.scoring == "fp8":
        state.forward.prepare_scoring()
    return state.config


def set_expert_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Restrict, per token, which experts the routers may use in the next forwards (None clears it).

    mask: bool, (N, E) with one row per token row the routed modules see (N = batch * seq, row-major; a
    packed continuous-batching forward has batch 1), or (E,) for every token; True = allowed. spectr and
    arrow pick their top-k among allowed experts only (pooled decisions too), weights are computed among
    the chosen; uniform averages over the allowed experts; fixed keeps its expert where allowed. A token
    with one allowed expert gets exactly that expert's LoRA delta; a token with none gets the base output.
    The mask stays until the next call: during generate() use an (E,) mask, or set one per step.
    """
    state: RoutedState | None = getattr(model, "spectr", None)
    if state is None or state.forward is None:
        raise ValueError("set_expert_mask: model has no bundle loaded; call load_bundle(model, bundle) first")
    if mask is None:
        state.forward.expert_mask = None
        return
    E = len(state.bundle.expert_names)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"set_expert_mask: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() not in (1, 2) or mask.shape[-1] != E:
        raise ValueError(f"set_expert_mask: mask has shape {tuple(mask.shape)}; expected (N, {E}) or ({E},) "
                         f"for the bundle's {E} experts")
    device = model.get_submodule(state.modules[0]).Vt.device
    state.forward.expert_mask = mask.to(device)


def set_token_top_k(model: nn.Module, k: torch.Tensor | None) -> None:
    """Give each token row its own top_k in the next forwards (None clears it: every token uses the config's).

    k: int (N,), one per token row the routed modules see (N = batch * seq, row-major, the rows of
    set_expert_mask), each >= 1. spectr and arrow then pick each token's own k best experts (among its allowed
    ones, so at most as many as it may use); weights (softmax or 1/k) are computed over that token's chosen
    experts, and pooled decisions (pool="input"/"layer") keep each token's k. A token with k=1 routes exactly
    as with top_k=1, one with k=2 as with top_k=2, in the same batch. uniform and fixed ignore it. Shapes stay
    static (every expert is ranked, ranks past k_t get no weight), so it compiles; on a GPU the Triton routing
    kernel is bypassed for the torch code while a per-token k is set. The values are checked here (one host
    sync when k is on a GPU). Like the mask it stays until the next call: during generate() set one per
    forward (a forward pre-hook), as `spectr serve` does.
    """
    state: RoutedState | None = getattr(model, "spectr", None)
    if state is None or state.forward is None:
        raise ValueError("set_token_top_k: model has no bundle loaded; call load_bundle(model, bundle) first")
    if k is None:
        state.forward.token_k = None
        return
    if not isinstance(k, torch.Tensor) or k.dtype.is_floating_point or k.dtype == torch.bool or k.is_complex():
        raise ValueError(f"set_token_top_k: k must be an integer tensor, got {getattr(k, 'dtype', type(k))}")
    if k.dim() != 1:
        raise ValueError(f"set_token_top_k: k has shape {tuple(k.shape)}; expected (N,), one k per token row")
    if k.numel() and int(k.min()) < 1:
        raise ValueError(f"set_token_top_k: every k must be >= 1, got {int(k.min())}")
    device = model.get_submodule(state.modules[0]).Vt.device
    state.forward.token_k = k.to(device, torch.int64)


def unload_bundle(model: nn.Module) -> nn.Module:
    """Put the original modules back; the model is then exactly what it was before load_bundle."""
    state: RoutedState | None = getattr(model, "spectr", None)
    if state is None:
        raise ValueError("model has no bundle loaded")
    for m in state.modules:
        routed = model.get_submodule(m)
        if routed.W_group is not None:  # the group GEMM's layout: the base weights get their own storage back
            release_group(routed.siblings)
    for m in state.modules:
        parent, _, child = m.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(m).base_layer)
    for hook in state.hooks:
        hook.remove()
    for k, v in (state.generation or {}).items():
        setattr(model.generation_config, k, v)
    del model.spectr
    return model
