"""Rebuild a LoRA expert library (like ../shared/experts) from text domains.

One expert per domain: LoRA on every linear module of the base except lm_head, trained on the domain's
documents packed into fixed-length blocks. Defaults mirror how the shared library was made (r=8, alpha=16,
dropout 0.05, 300 steps, batch 16 x 256 tokens, AdamW lr 2e-4 constant, bf16 autocast, seed 0).

    python benchmarks/train_experts.py --base BASE_DIR --data DATASETS_DIR --out EXPERTS_DIR [--eval]

Writes <out>/<domain>/ (PEFT save_pretrained + train_log.json) and, with --eval, <out>/losses.json
shaped like ../shared/experts/losses.json (mean next-token loss of base and each expert on every test split).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class TrainError(Exception):
    """Bad input to the trainer (file, domain, sizes)."""


def read_texts(path: Path) -> list[str]:
    """The "text" field of every line of a JSONL file; a one-line error names the file and line."""
    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TrainError(f"{path}:{i}: not a JSON object with a 'text' field ({exc})") from None
            if not isinstance(text, str):
                raise TrainError(f"{path}:{i}: 'text' is {type(text).__name__}, not a string")
            texts.append(text)
    if not texts:
        raise TrainError(f"{path}: no documents")
    return texts


def pack_blocks(texts: list[str], tokenizer: Any, seq: int, source: Path | str = "?") -> torch.Tensor:
    """Tokenize each document, append EOS, concatenate, cut into [n, seq] blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainError(f"{source}: the tokenizer has no eos_token_id")
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(eos)
    n = len(ids) // seq
    if n == 0:
        raise TrainError(f"{source}: {len(ids)} tokens, fewer than one block of {seq}")
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def domain_files(args: argparse.Namespace) -> dict[str, Path]:
    """domain -> train.jsonl, from --data DIR subfolders and/or --domain NAME=FILE (all of them)."""
    files: dict[str, Path] = {}
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise TrainError(f"{root}: --data is not a folder")
        for sub in sorted(p for p in root.iterdir() if (p / "train.jsonl").is_file()):
            files[sub.name] = sub / "train.jsonl"
    for spec in args.domain or []:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise TrainError(f"--domain {spec!r}: expected NAME=FILE.jsonl")
        files[name] = Path(file)
    if not files:
        raise TrainError("no domains: give --data DIR (with <domain>/train.jsonl) or --domain NAME=FILE")
    return files


def selected(files: dict[str, Path], domains: str | None) -> dict[str, Path]:
    """The domains to train: --domains a,b in that order, or all."""
    if not domains:
        return files
    wanted = [d.strip() for d in domains.split(",") if d.strip()]
    missing = [d for d in wanted if d not in files]
    if missing:
        raise TrainError(f"--domains {','.join(missing)}: not found among {sorted(files)}")
    return {d: files[d] for d in wanted}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def load_base(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise TrainError(f"{path}: --base must be a transformers folder holding config.json")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def linear_names(model: Any) -> list[str]:
    """Short names of every nn.Linear except the output layer (lm_head), e.g. q_proj ... down_proj."""
    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})


def target_names(model: Any, targets: str | None) -> list[str]:
    """The modules to adapt: every linear one (linear_names), or the --targets subset (short names, comma list)."""
    names = linear_names(model)
    if not targets:
        return names
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in names]
    if unknown or not wanted:
        raise TrainError(f"--targets {targets}: {', '.join(unknown) or 'empty'} is not a linear module of the base "
                         f"(it has {', '.join(names)})")
    return wanted


def lora_config(args: argparse.Namespace, targets: list[str]):
    from peft import LoraConfig

    # Short module names (as in ../shared/experts), not PEFT's "all-linear", which saves full paths.
    return LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


@torch.no_grad()
def mean_loss(model: Any, blocks: torch.Tensor, batch: int, device: torch.device, bf16: bool) -> float:
    """Mean next-token cross-entropy over all blocks (each block has the same length, so a mean of means)."""
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch].to(device)
        with autocast(device, bf16):
            total += model(input_ids=x, labels=x).loss.float().item() * len(x)
    return total / len(blocks)


def train_domain(args: argparse.Namespace, blocks: torch.Tensor, device: torch.device) -> tuple[Any, dict]:
    """Fresh base + LoRA, trained for args.steps on the shuffled, cycled blocks. Returns (peft model, log)."""
    from peft import get_peft_model

    torch.manual_seed(args.seed)
    base = load_base(args.base, device)
    model = get_peft_model(base, lora_config(args, target_names(base, args.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    losses: list[float] = []
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pos = 0
    for _ in range(args.steps):
        idx = order[(pos + torch.arange(args.batch)) % len(order)]
        pos = (pos + args.batch) % len(order)
        x = blocks[idx].to(device, non_blocking=True)
        with autocast(device, args.bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses_f = [float(v) for v in torch.stack(losses).cpu()]  # one sync at the end, not one per step
    seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in losses_f):
        raise TrainError(f"training diverged: non-finite loss at step {next(i for i, v in enumerate(losses_f) if not math.isfinite(v))}")
    log = {"losses": losses_f, "seconds": seconds, "steps": args.steps, "tokens_per_step": args.batch * blocks.shape[1],
           "n_blocks": len(blocks), "trainable_params": sum(p.numel() for p in params), "device": str(device)}
    if device.type == "cuda":
        log["gpu"] = torch.cuda.get_device_name(device)
    return model, log


def save_expert(model: Any, folder: Path, args: argparse.Namespace, log: dict) -> None:
    """PEFT save_pretrained into folder.partial, then rename, so a failure leaves nothing half-written."""
    import peft
    import transformers

    model.peft_config["default"].base_model_name_or_path = args.base_name
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.save_dtype == "bf16":
        # Round the LoRA factors to bf16 for a bf16 file; keep them in fp32 memory so eval sees the saved values.
        lora = [m for n, m in model.named_modules() if n.split(".")[-1] in ("lora_A", "lora_B")]
        for m in lora:
            m.to(torch.bfloat16)
        model.save_pretrained(tmp, save_embedding_layers=False)
        for m in lora:
            m.to(torch.float32)
    else:
        model.save_pretrained(tmp, save_embedding_layers=False)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    (tmp / "train_log.json").write_text(json.dumps({**log, "args": run_args, "versions": versions}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def held_out_files(args: argparse.Namespace, train: dict[str, Path]) -> dict[str, Path]:
    """domain -> test.jsonl: every <data>/<domain>/test.jsonl (trained or not), and test.jsonl beside each train file."""
    files = {}
    if args.data:
        files = {p.name: p / "test.jsonl" for p in sorted(Path(args.data).iterdir()) if (p / "test.jsonl").is_file()}
    for name, f in train.items():
        files.setdefault(name, f.with_name("test.jsonl"))
    return files


def held_out_blocks(files: dict[str, Path], tokenizer: Any, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The first --eval-blocks packed blocks of each test file."""
    return {name: pack_blocks(read_texts(f), tokenizer, args.seq, f)[: args.eval_blocks] for name, f in files.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="transformers folder (spectr.smollm2.build_smollm2 makes one)")
    p.add_argument("--base-name", default=DEFAULT_BASE_NAME, help="base_model_name_or_path written into each adapter")
    p.add_argument("--data", type=Path, help="folder of <domain>/train.jsonl (and test.jsonl for --eval)")
    p.add_argument("--domain", action="append", help="NAME=FILE.jsonl, repeatable")
    p.add_argument("--domains", help="comma list: train only these domains")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", help="comma list of module names to adapt (default: every linear module but lm_head), "
                                     "e.g. q_proj,k_proj,v_proj,o_proj for attention only")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    p.add_argument("--save-dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--eval", action="store_true", help="write <out>/losses.json (base and each expert on every test split)")
    p.add_argument("--eval-blocks", type=int, default=64, help="test blocks of --seq tokens per domain")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "rank", "eval_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (and optionally evaluate) every selected domain; returns {"logs": ..., "losses": ...}."""
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device here (use --device cpu)")
    files = domain_files(args)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    blocks = {name: pack_blocks(read_texts(f), tokenizer, args.seq, f) for name, f in selected(files, args.domains).items()}
    tests = held_out_blocks(held_out_files(args, files), tokenizer, args) if args.eval else {}
    if args.targets:  # check the names before anything is written: the architecture alone, on the meta device
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            target_names(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.base)), args.targets)
    args.out.mkdir(parents=True, exist_ok=True)
    losses: dict[str, dict[str, float]] = {}
    if args.eval:
        base = load_base(args.base, device)
        losses["base"] = {d: mean_loss(base, b, args.batch, device, args.bf16) for d, b in tests.items()}
        del base
    logs = {}
    for name, train in blocks.items():
        model, log = train_domain(args, train, device)
        save_expert(model, args.out / name, args, log)
        if args.eval:
            losses[name] = {d: mean_loss(model, b, args.batch, device, args.bf16) for d, b in tests.items()}
            (args.out / name / "losses.json").write_text(json.dumps(losses[name]))
        logs[name] = log
        print(f"{name}: {args.steps} steps in {log['seconds']:.1f}s, loss {log['losses'][0]:.3f} -> "
              f"{sum(log['losses'][-10:]) / len(log['losses'][-10:]):.3f} (mean of last 10)", flush=True)
        del model
    if args.eval:
        (args.out / "losses.json").write_text(json.dumps(losses, indent=1))
    return {"logs": logs, "losses": losses}


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
