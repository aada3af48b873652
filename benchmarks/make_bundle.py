"""A runtime bundle straight from PEFT adapter folders, without a registry (for benchmarks and GPU runs).

Same validation and exact spectra as `spectr ingest`, same format as `spectr bundle create`.

    python benchmarks/make_bundle.py --base PATH --experts ../shared/experts -o /tmp/lib-bundle
"""
from __future__ import annotations

import argparse
from pathlib import Path


from spectr.pipeline.basemodel import resolve_base_model  # noqa: E402
from spectr.pipeline.fetch import fetch  # noqa: E402
from spectr.pipeline.spectra import adapter_spectra  # noqa: E402
from spectr.pipeline.validate import load_adapter  # noqa: E402
from spectr.runtime import write_bundle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="base model folder (config.json)")
    ap.add_argument("--experts", type=Path, required=True, help="folder of PEFT adapter folders")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    base = resolve_base_model(args.base)
    experts = []
    for folder in sorted(p for p in args.experts.iterdir() if (p / "adapter_config.json").is_file()):
        adapter = load_adapter(fetch(str(folder)), base)
        info = {"name": adapter.source.name, "version": 0, "content_sha256": adapter.content_sha256,
                "rank": adapter.rank, "alpha": adapter.alpha, "source": str(folder)}
        experts.append((info, adapter_spectra(adapter)))
    write_bundle(args.out, base=base.manifest(), experts=experts)
    print(f"{args.out}: {len(experts)} experts")


if __name__ == "__main__":
    main()
