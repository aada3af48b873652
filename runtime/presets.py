"""Named router presets: the one set of names the runtime, the CLI and evaluation use.

A preset fixes every routing setting of RouterConfig (so switching presets never leaks a setting from the
previous one); `apply`/`dense_max`/`scoring` (how the math runs, not what it computes) are left alone. The values of
"default" are RouterConfig's own defaults, which follow the routing study (docs/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from spectr.runtime.layer import RouterConfig
from spectr.runtime.routing import SCORINGS

# The settings a preset fixes: what a router computes.
ROUTING_FIELDS = ("router", "top_k", "weighting", "temperature", "combine", "score", "rank_normalize", "expert",
                  "pool", "smooth", "prompt_mean", "depth_evidence", "depth_decay", "attn_follows_mlp", "calibrate")
# The round-two options (routing.py), all off: what the paper's code and PEFT's Arrow do.
_OFF = dict(prompt_mean=0.0, depth_evidence="none", depth_decay=0.5, attn_follows_mlp=False, calibrate="none")

_DEFAULTS = {f.name: f.default for f in fields(RouterConfig) if f.name in ROUTING_FIELDS}

# The SpectR paper's code: k=4, 1/k weights, factor merge, each module deciding on its own.
REFERENCE = dict(router="spectr", top_k=4, weighting="uniform", temperature=1.0, combine="factor", score="norm",
                 rank_normalize=False, pool="module", smooth=0.0, **_OFF)
# PEFT's Arrow (create_arrow_model): |v_1^T x| per module, softmax over the top-k, output mix.
PEFT_ARROW = dict(router="arrow", top_k=3, weighting="softmax", temperature=1.0, combine="mix", score="norm",
                  rank_normalize=False, pool="module", smooth=0.0, **_OFF)

PRESETS: dict[str, dict[str, Any]] = {
    # The runtime's default (the study's choice): ||V^T x||, top-1, q/k/v and gate/up decide together, output mix.
    "default": dict(_DEFAULTS),
    "reference": {**_DEFAULTS, **REFERENCE},
    "reference-sigma": {**_DEFAULTS, **REFERENCE, "score": "sigma"},  # ||Sigma V^T x||
    "reference-ranknorm": {**_DEFAULTS, **REFERENCE, "rank_normalize": True},  # ||V^T x|| / sqrt(r)
    "reference-pooled": {**_DEFAULTS, **REFERENCE, "pool": "input"},  # the reference, q,k,v / gate,up together
    "peft-arrow": {**_DEFAULTS, **PEFT_ARROW},
    # Every expert that adapts a module at weight 1/E (the merge of all experts), whatever the scores.
    "uniform": {**_DEFAULTS, "router": "uniform", "combine": "mix"},
    # One expert alone (plain LoRA): needs expert=NAME (the CLI's fixed:NAME).
    "fixed": {**_DEFAULTS, "router": "fixed"},
}
DEFAULT_PRESET = "default"
# What `spectr eval routing` compares unless told otherwise: the paper's code, PEFT's Arrow, the runtime's default.
EVAL_PRESETS = ("reference", "peft-arrow", "default")


def preset_settings(preset: str, n_experts: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A preset's complete routing settings with overrides applied; top_k clipped to n_experts when given."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(RouterConfig)})
    if unknown:
        raise ValueError(f"unknown router setting {unknown[0]!r}; expected RouterConfig fields "
                         f"({', '.join(f.name for f in fields(RouterConfig))})")
    settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None or k == "expert"}}
    if int(settings["top_k"]) < 1:  # clipping to E is a convenience; a k below 1 is a mistake
        raise ValueError(f"top_k must be >= 1, got {settings['top_k']}")
    if n_experts is not None:
        settings["top_k"] = max(1, min(int(settings["top_k"]), n_experts))
    return settings


def parse_preset(spec: str) -> tuple[str, str | None]:
    """The CLI's preset argument: a preset name, or "fixed:NAME" (one expert alone) -> (preset, expert)."""
    name, _, expert = spec.partition(":")
    if name == "fixed" and not expert:
        raise ValueError("preset fixed needs an expert: fixed:NAME")
    if name != "fixed" and expert:
        raise ValueError(f"preset {name} takes no expert (got {spec!r}); only fixed:NAME does")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)} (fixed as fixed:NAME)")
    return name, expert or None


def check_scoring(scoring: str) -> None:
    """ValueError (one line) unless scoring is a RouterConfig.scoring value; checked before a model loads."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
