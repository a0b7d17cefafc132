"""Where a GPU's training departs from the CPU's: the same start, the same batches, step by step.

    python scripts/compare_devices.py --device cuda          # quickstart shape, first 30 SFT batches, ~1 minute
    python scripts/compare_devices.py --device cpu --steps 3 --batch_size 4    # CPU against itself: all zeros

From one set of initial weights (seeded random init, or --from_weight) and the first --steps batches of
the quickstart's synthetic SFT data (the trainer's own uniformly shuffled, packed batches), the
trainer's real step (`batch_loss` + `optimizer_step`, AdamW, clipping, the cosine schedule) runs once
on the CPU in float32 (the reference) and then on --device once per variant. A variant switches
one numerical knob at a time, starting from the strictest float32 settings:

  strict            TF32 off (matmul and cuDNN), SDPA's math kernel, AdamW's per-tensor loop
  strict_again      the same again: the run-to-run noise floor (CUDA's atomics, e.g. embedding backward)
  cudnn_tf32        TF32 in cuDNN (the CLIP patch convolution); torch's default on CUDA
  matmul_tf32       TF32 in matrix products (torch's default: off)
  sdpa_default      SDPA picks its kernel (efficient / flash / cuDNN) instead of math
  adamw_foreach     AdamW's multi-tensor kernel (torch's default on CUDA)
  adamw_fused       AdamW's fused kernel
  torch_default     what the trainer's --dtype float32 runs on CUDA: every knob at torch's default
  bf16_autocast     torch_default + bfloat16 autocast: the trainer's default on CUDA

Per variant: the loss difference at step 1, the largest over all steps and at the last step, the
parameter whose step-1 gradient differs most (relative L2 norm) and by how much, and the largest
weight difference after the last step. The CPU is its own reference when --device cpu: the
torch_default variant then must show exactly zero (the test checks it).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import PROJECT_TOKENIZER, TINY_CLIP, resolve
from model.argtypes import positive_float, positive_int, seed_int


@dataclass(frozen=True)
class Variant:
    """One setting of the knobs that change float32 results on CUDA (None: torch's default)."""
    matmul_tf32: bool | None = False
    cudnn_tf32: bool | None = False
    sdpa_math: bool = True
    foreach: bool | None = False
    fused: bool | None = None
    autocast: torch.dtype | None = None


STRICT = Variant()
VARIANTS: dict[str, Variant] = {
    "strict": STRICT,
    "strict_again": STRICT,
    "cudnn_tf32": Variant(cudnn_tf32=True),
    "matmul_tf32": Variant(matmul_tf32=True),
    "sdpa_default": Variant(sdpa_math=False),
    "adamw_foreach": Variant(foreach=True),
    "adamw_fused": Variant(foreach=None, fused=True),
    "torch_default": Variant(matmul_tf32=None, cudnn_tf32=None, sdpa_math=False, foreach=None),
    "bf16_autocast": Variant(matmul_tf32=None, cudnn_tf32=None, sdpa_math=False, foreach=None, autocast=torch.bfloat16),
}
DEFAULT = VARIANTS["torch_default"]


@contextmanager
def knobs(v: Variant) -> Iterator[None]:
    """Set the variant's TF32 flags and SDPA kernel choice for the block, then restore torch's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if v.matmul_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = v.matmul_tf32
        if v.cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = v.cudnn_tf32
        with ExitStack() as stack:
            if v.sdpa_math:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Trace:
    """What one run records: the loss of every step, step 1's gradients and the final weights (on the CPU)."""
    losses: list[float] = field(default_factory=list)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def trainer_args(data: Path, clip: Path, hidden: int, layers: int, batch_size: int, max_seq_len: int, lr: float,
                 seed: int, from_weight: str) -> argparse.Namespace:
    """The SFT trainer's own flags for the quickstart's shape (so the data and model come out as its own)."""
    from trainer.train_loop import build_parser
    return build_parser("sft").parse_args([
        "--data_path", str(data), "--vision_model_path", str(clip), "--tokenizer_path", str(PROJECT_TOKENIZER),
        "--hidden_size", str(hidden), "--num_hidden_layers", str(layers), "--batch_size", str(batch_size),
        "--max_seq_len", str(max_seq_len), "--learning_rate", str(lr), "--seed", str(seed),
        "--from_weight", from_weight, "--freeze_llm", "0", "--device", "cpu"])


def first_batches(args: argparse.Namespace, config, steps: int) -> list[dict]:
    """The trainer's first `steps` batches of epoch 0 (uniform order, packed as --packing 1 packs)."""
    from trainer.data import make_loader
    from trainer.train_loop import Env, build_data
    dataset, _, _ = build_data(args, Env(0, 0, 1, torch.device("cpu")), config)
    loader = make_loader(dataset, args.batch_size, 0, 1, args.seed, 0, 0, 0, False, show_progress=False,
                         pack_len=args.max_seq_len)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            return batches
    raise SystemExit(f"compare_devices: {args.data_path} gives only {len(batches)} batches of {args.batch_size}; "
                     f"lower --steps")


def train_steps(model: torch.nn.Module, batches: list[dict], device: torch.device, variant: Variant,
                lr: float, grad_clip: float = 1.0) -> Trace:
    """The trainer's step over `batches` on a copy of `model` moved to `device`, under the variant's knobs."""
    from trainer.recipe import get_lr
    from trainer.train_loop import batch_loss, optimizer_step
    model = copy.deepcopy(model).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=variant.foreach, fused=variant.fused)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    autocast = nullcontext() if variant.autocast is None else torch.autocast(device.type, dtype=variant.autocast)
    names = {p: n for n, p in model.named_parameters()}
    trace = Trace()
    t0 = time.perf_counter()
    with knobs(variant):
        for step, batch in enumerate(batches):
            loss = batch_loss(model, model, batch, device, autocast)
            loss.backward()
            trace.losses.append(loss.item())
            if step == 0:
                trace.grads = {names[p]: p.grad.detach().float().cpu() for p in params if p.grad is not None}
            optimizer_step(optimizer, scaler, params, grad_clip, get_lr(step, len(batches), lr))
    trace.seconds = time.perf_counter() - t0
    trace.weights = {names[p]: p.detach().float().cpu() for p in params}
    return trace


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    norm = a.norm().item()
    return (a - b).norm().item() / norm if norm > 0 else (a - b).norm().item()


def compare(ref: Trace, other: Trace) -> dict:
    """The differences of `other` from `ref`, as one table row."""
    dl = [abs(a - b) for a, b in zip(ref.losses, other.losses)]
    grad = {n: relative_diff(g, other.grads[n]) for n, g in ref.grads.items()}
    worst = max(grad, key=grad.get)
    return dict(loss_diff_step1=dl[0], loss_diff_max=max(dl), loss_diff_last=dl[-1],
                worst_grad_param=worst, worst_grad_rel=grad[worst],
                median_grad_rel=float(torch.tensor(list(grad.values())).median()),
                weight_diff_max=max((w - other.weights[n]).abs().max().item() for n, w in ref.weights.items()),
                loss_last=other.losses[-1], seconds=other.seconds)


def run(args: argparse.Namespace) -> dict:
    """Build the model and batches once, run the CPU reference and every variant; returns the report."""
    from trainer.train_loop import Env, build_model, seed_everything
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"compare_devices: --variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    targs = trainer_args(args.data_path, args.vision_model_path, args.hidden_size, args.num_hidden_layers,
                         args.batch_size, args.max_seq_len, args.learning_rate, args.seed, args.from_weight)
    seed_everything(args.seed)
    model = build_model(targs, Env(0, 0, 1, torch.device("cpu")), None if args.from_weight == "none"
                        else Path(args.from_weight))
    batches = first_batches(targs, model.config, args.steps)
    device = torch.device(args.device)
    print(f"{args.steps} SFT batches of {args.batch_size} rows (packed to {args.max_seq_len}), hidden "
          f"{args.hidden_size} x {args.num_hidden_layers}; reference: cpu float32 with torch's defaults; "
          f"variants on {device}", flush=True)
    ref = train_steps(model, batches, torch.device("cpu"), DEFAULT, args.learning_rate)
    print(f"reference: losses {ref.losses[0]:.5f} .. {ref.losses[-1]:.5f} in {ref.seconds:.1f} s", flush=True)
    rows = []
    for name in names:
        row = dict(variant=name, **compare(ref, train_steps(model, batches, device, VARIANTS[name], args.learning_rate)))
        rows.append(row)
        print(table([row], header=len(rows) == 1), flush=True)
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, steps=args.steps, reference_losses=ref.losses, rows=rows)


COLUMNS = [("variant", "{:14s}"), ("loss_diff_step1", "{:.2e}"), ("loss_diff_max", "{:.2e}"),
           ("loss_diff_last", "{:.2e}"), ("loss_last", "{:.4f}"), ("worst_grad_rel", "{:.2e}"),
           ("worst_grad_param", "{}"), ("median_grad_rel", "{:.2e}"), ("weight_diff_max", "{:.2e}")]


def table(rows: list[dict], header: bool = True) -> str:
    lines = [" | ".join(c for c, _ in COLUMNS), " | ".join("---" for _ in COLUMNS)] if header else []
    lines += [" | ".join(f.format(r[c]) for c, f in COLUMNS) for r in rows]
    return "\n".join("| " + line + " |" for line in lines)


def get_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data_path", type=Path, default=Path("dataset/synthetic/sft.parquet"),
                    help="the quickstart's SFT file (python scripts/make_synthetic_data.py writes it)")
    ap.add_argument("--vision_model_path", type=Path, default=TINY_CLIP)
    ap.add_argument("--from_weight", default="none", help="a .pth file to start from (default: seeded random init)")
    ap.add_argument("--hidden_size", type=positive_int, default=128)
    ap.add_argument("--num_hidden_layers", type=positive_int, default=4)
    ap.add_argument("--batch_size", type=positive_int, default=16)
    ap.add_argument("--max_seq_len", type=positive_int, default=640)
    ap.add_argument("--learning_rate", type=positive_float, default=1e-3)
    ap.add_argument("--steps", type=positive_int, default=30)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    args.data_path, args.vision_model_path = resolve(args.data_path), resolve(args.vision_model_path)
    if args.vision_model_path == TINY_CLIP:
        from scripts.make_tiny_clip import make_clip
        make_clip(TINY_CLIP)  # reused when already there
    if not args.data_path.is_file():
        raise SystemExit(f"compare_devices: --data_path {args.data_path} not found "
                         f"(python scripts/make_synthetic_data.py writes dataset/synthetic/sft.parquet)")
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
