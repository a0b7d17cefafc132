"""The one MiniMind-V training loop behind trainer/train_pretrain_vlm.py and trainer/train_sft_vlm.py.

    python trainer/train_pretrain_vlm.py [flags]                      one GPU, or the CPU
    torchrun --nproc_per_node N trainer/train_sft_vlm.py [flags]      DDP: NCCL on CUDA, gloo on CPU

A step: a uniformly random batch of rows, packed side by side into sequences of at most max_seq_len
tokens (or padded to its longest row) -> the frozen CLIP encoder, once for every image of the
batch, in inference mode (or the on-disk feature cache) -> the VLM forward, whose loss projects
only the supervised positions to the vocabulary -> backward (DDP's all-reduce only on the last
micro-batch of an accumulation group) -> unscale, clip, AdamW step at the
published recipe's learning rate (cosine from lr down to lr/10).
Weight and resume files are written atomically by rank 0 (see checkpoint.py).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.training import add_eval_args, check_eval_data, score_record
from benchmarks.training import due as eval_due
from model import DATA_DIR, DEFAULT_CLIP, DEFAULT_TOKENIZER, OUT_DIR, resolve
from model.model_minimind import segment_attention_mask
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import MiniMindVLMProcessor, load_tokenizer, vision_geometry
from model.weights import VISION_PREFIX, load_weights, save_weights, weight_path
from trainer import checkpoint as ckpt
from trainer.data import RankSampler, make_loader
from trainer.feature_cache import FeatureCache, fingerprint
from trainer.progress import Progress, open_tracker, peak_memory_mb
from trainer.recipe import FREEZE_CHOICES, Position, get_lr, resume_position, set_trainable, steps_per_epoch

log = logging.getLogger("minimind.train")

# The published defaults of each stage (the original scripts' own); everything else is shared.
STAGES: dict[str, dict[str, Any]] = {
    "pretrain": dict(data_path=DATA_DIR / "pretrain_data.parquet", from_weight="llm", save_weight="pretrain_vlm",
                     epochs=4, batch_size=16, learning_rate=4e-4, max_seq_len=640, freeze_llm=1),
    "sft": dict(data_path=DATA_DIR / "sft_data.parquet", from_weight="pretrain_vlm", save_weight="sft_vlm",
                epochs=2, batch_size=4, learning_rate=1e-6, max_seq_len=1536, freeze_llm=0),
}


def build_parser(stage: str) -> argparse.ArgumentParser:
    d = STAGES[stage]
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage} (see the README's Training section)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--save_dir", default=str(OUT_DIR),
      help="folder of weight, resume and metrics files (relative: from the working directory)")
    a("--save_weight", default=d["save_weight"],
      help="name prefix of the saved weights: {save_dir}/{save_weight}_{hidden}{_moe}.pth")
    a("--epochs", type=int, default=d["epochs"])
    a("--batch_size", type=int, default=d["batch_size"], help="rows per micro-batch per process")
    a("--learning_rate", type=float, default=d["learning_rate"], help="peak learning rate (cosine to a tenth of it)")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="under torchrun: cuda:LOCAL_RANK")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="CUDA autocast dtype (float16 adds a GradScaler); the CPU always trains in float32")
    a("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader worker processes")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=float, default=1.0, help="max global gradient norm")
    a("--log_interval", type=int, default=100, help="optimizer steps between metrics records")
    a("--save_interval", type=int, default=100, help="optimizer steps between weight + resume saves (also at every epoch end)")
    a("--hidden_size", type=int, default=512)
    a("--num_hidden_layers", type=int, default=8)
    a("--max_seq_len", type=int, default=d["max_seq_len"], help="rows are truncated to this many tokens")
    a("--use_moe", type=int, default=0, choices=[0, 1])
    a("--data_path", default=str(d["data_path"]), help=".parquet (conversations + image_bytes) or .jsonl (+ --images_path)")
    a("--images_path", default=None, help="image folder of a .jsonl data file (default: images/ next to it)")
    a("--from_weight", default=d["from_weight"],
      help="NAME loads {save_dir}/NAME_{hidden}{_moe}.pth; a file path loads that file; none = random LM weights")
    a("--from_resume", type=int, default=0, choices=[0, 1],
      help="1: continue from {save_dir}/{save_weight}_{hidden}{_moe}_resume.pth if present")
    a("--freeze_llm", type=int, default=d["freeze_llm"], choices=sorted(FREEZE_CHOICES),
      help="; ".join(f"{k}: {v}" for k, v in FREEZE_CHOICES.items()))
    a("--use_compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the decoder stack")
    a("--use_wandb", action="store_true", help="log to wandb (or swanlab) when installed")
    a("--wandb_project", default=f"MiniMind-V-{stage.capitalize()}")
    a("--vision_model_path", default=str(DEFAULT_CLIP), help="CLIP ViT-B/16 folder (vision tower only is used)")
    a("--tokenizer_path", default=str(DEFAULT_TOKENIZER), help="tokenizer folder (offline runs: model/tokenizer)")
    a("--seed", type=int, default=42, help="model init and data order; the run is a function of it")
    a("--max_steps", type=int, default=0, help="stop after this many optimizer steps in all (0: run every epoch); "
      "the schedule then spans max_steps")
    a("--group_by_length", type=int, default=0, choices=[0, 1],
      help="1: batches of rows of similar length (less padding, but correlated batches: see the README)")
    a("--packing", type=int, default=1, choices=[0, 1],
      help="1: pack each batch's rows into sequences of at most --max_seq_len tokens (the same rows, less "
      "padding; attention never crosses rows); 0: pad every row to the batch's longest")
    a("--feature_cache", default=None, help="folder for an on-disk cache of the frozen encoder's features "
      "(worth it from the second epoch on)")
    add_eval_args(p)
    return p


# ---------------------------------------------------------------------------------------------
@dataclass
class Env:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Env:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (single- and multi-node alike); plain python does not."""
    if "RANK" not in os.environ:
        return Env(0, 0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Env(dist.get_rank(), local_rank, dist.get_world_size(),
               torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def precision(dtype: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context, GradScaler): bf16 autocast by default on CUDA, fp16 + scaler on request, fp32 on CPU."""
    if device.type != "cuda" or dtype == "float32":
        return nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16: using float16 with a GradScaler")
        dtype = "float16"
    amp = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    return torch.autocast("cuda", dtype=amp), torch.amp.GradScaler("cuda", enabled=amp == torch.float16)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def from_weight_file(name: str, save_dir: Path, hidden: int, moe: bool) -> Path | None:
    """--from_weight: none, a file path, or a name looked up in --save_dir (the original ignored --save_dir)."""
    if name.lower() == "none":
        return None
    p = Path(name).expanduser()
    if p.suffix in (".pth", ".safetensors") or p.is_file():
        p = resolve(p)
    else:
        p = weight_path(save_dir, name, hidden, moe)
    if not p.is_file():
        raise FileNotFoundError(
            f"--from_weight {name}: {p} not found. Train the previous stage into --save_dir {save_dir}, "
            f"download published weights (python scripts/download.py), pass a file path, or use --from_weight none")
    return p


def build_model(args: argparse.Namespace, env: Env, weights: Path | None) -> MiniMindVLM:
    tower = resolve(args.vision_model_path)  # the model's image geometry is the tower's own
    config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       use_moe=bool(args.use_moe), **vision_geometry(tower))
    model = MiniMindVLM(config, vision_model_path=tower)
    if weights is not None:
        load_weights(model, weights)
    set_trainable(model, args.freeze_llm)
    return model.to(env.device)


# ---------------------------------------------------------------------------------------------
def encode_images(model: MiniMindVLM, pixel_values: torch.Tensor, num_images: torch.Tensor) -> torch.Tensor:
    """Vision features [B, Nmax, P, W] of a (host-side) batch, on the encoder's device: one encoder
    call over its real images only (the zero padding of multi-image batches is neither copied nor
    encoded), in inference mode."""
    with torch.inference_mode():
        feats = model.encode_images(pixel_values, num_images)
    return feats.clone()  # leave inference mode for autograd


def image_features(model: MiniMindVLM, batch: dict, device: torch.device, cache: FeatureCache | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(features, images per sequence) as the batch's sequences take them: per row [B, N, P, W] and
    num_images [B], or for a packed batch per pack [packs, M, P, W] (in the order of its image slots)
    and pack_num_images [P]. (None, None) without images."""
    if cache is not None:
        feats = cache.features(batch["index"].tolist(), batch["num_images"], batch["pixel_values"],
                               lambda pv, n: encode_images(model, pv, n))
        feats = None if feats is None else feats.to(device, non_blocking=True).float()
    else:
        feats = None if batch["pixel_values"] is None else encode_images(model, batch["pixel_values"],
                                                                         batch["num_images"])
    if feats is None:
        return None, None
    if "segment_ids" in batch:
        return feats[batch["image_row"].to(device), batch["image_pos"].to(device)], batch["pack_num_images"]
    return feats, batch["num_images"]


def batch_loss(model: torch.nn.Module, raw: MiniMindVLM, batch: dict, device: torch.device, autocast: Any,
               cache: FeatureCache | None = None) -> torch.Tensor:
    """The training loss of one micro-batch (cross-entropy over supervised positions + MoE aux loss),
    from a padded batch (`collate_fn`) or a packed one (`collate_packed`): the same number either way."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    mask, extra = batch["attention_mask"], {}
    packed = "segment_ids" in batch
    if packed:  # rows side by side: attention stays inside each row, positions restart with it
        mask = segment_attention_mask(batch["segment_ids"].to(device, non_blocking=True))
        extra["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    elif bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding under causal attention: real tokens never see the pads after them and pads
        # are unsupervised, so the mask changes nothing but would force the slower masked path.
        mask = None
    else:
        mask = mask.to(device)
    with autocast:
        feats, num_images = image_features(raw, batch, device, cache)
        out = model(input_ids=ids, labels=labels, image_features=feats, num_images=num_images, return_logits=False,
                    attention_mask=mask, **extra)
    return out.loss


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
                   grad_clip: float, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable model state, to check that every DDP rank ends with the same weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not k.startswith(VISION_PREFIX):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class StopRequest:
    """SIGINT/SIGTERM ask for a clean stop at the next step boundary (resume file written); a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.flag = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True


# ---------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = setup_distributed(args.device)
    if not env.main:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(args.seed + env.rank)
    autocast, scaler = precision(args.dtype, env.device)
    log.info("%d process(es) on %s, %s", env.world, env.device, "fp32" if isinstance(autocast, nullcontext)
             else f"{autocast.fast_dtype} autocast" + (" + GradScaler" if scaler.is_enabled() else ""))

    save_dir = Path(args.save_dir).expanduser()
    hidden, moe = args.hidden_size, bool(args.use_moe)
    weights_out = weight_path(save_dir, args.save_weight, hidden, moe)
    resume_file = ckpt.resume_path(save_dir, args.save_weight, hidden, moe)
    metrics_file = weights_out.with_name(weights_out.stem + "_metrics.jsonl")
    if env.main:
        save_dir.mkdir(parents=True, exist_ok=True)
        for p in (weights_out, resume_file):
            ckpt.remove_stale_temporaries(p)

    check_eval_data(args)
    state = ckpt.load_resume(resume_file) if args.from_resume and resume_file.is_file() else None
    if args.from_resume and state is None:
        log.info("--from_resume 1: no %s yet, starting fresh", resume_file)
    init = None if state is not None else from_weight_file(args.from_weight, save_dir, hidden, moe)
    model = build_model(args, env, init)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    n_all = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(VISION_PREFIX))
    log.info("model: %.2fM parameters (vision encoder excluded), %.3fM trainable (--freeze_llm %d: %s)",
             n_all / 1e6, sum(p.numel() for p in params) / 1e6, args.freeze_llm, FREEZE_CHOICES[args.freeze_llm])

    from dataset.lm_dataset import BadRowStats, VLMDataset
    processor = MiniMindVLMProcessor.from_config(model.config, load_tokenizer(resolve(args.tokenizer_path)))
    dataset = VLMDataset(resolve(args.data_path), processor, max_length=args.max_seq_len,
                         image_root=resolve(args.images_path) if args.images_path else None)
    cache = None
    if args.feature_cache:
        cache = FeatureCache(Path(args.feature_cache).expanduser(), fingerprint(dataset.path, resolve(args.vision_model_path)))
    geometry = RankSampler(dataset.lengths(show_progress=env.main), args.batch_size, env.rank, env.world, args.seed,
                           bool(args.group_by_length))
    n_epoch, batches = geometry.epoch_samples, geometry.batches_per_rank
    spe = steps_per_epoch(batches, args.accumulation_steps)
    total = args.epochs * spe if not args.max_steps else min(args.epochs * spe, args.max_steps)

    pos, tracker_id = Position(0, 0, 0), None
    if state is not None:
        ckpt.restore_model(model, state["model"], resume_file)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        pos = resume_position(state["epoch"], state["samples"], n_epoch, args.batch_size, env.world,
                              args.accumulation_steps, batches)
        same_geometry = (state["world_size"], state["batch_size"], state["accumulation_steps"]) == (
            env.world, args.batch_size, args.accumulation_steps)
        rng = state["rng"]
        ckpt.set_rng_state(rng[env.rank] if same_geometry and len(rng) == env.world else rng[0])
        tracker_id = state.get("tracker_id")
        log.info("resumed from %s: epoch %d, sample %d of %d, step %d%s", resume_file, pos.epoch + 1, pos.samples,
                 n_epoch, pos.step, "" if same_geometry else
                 f" (saved with world size {state['world_size']}, batch {state['batch_size']}: continuing at the same sample)")

    # MoE's load-balancing loss is taken per sequence, so packing would change it: MoE trains padded.
    pack_len = args.max_seq_len if args.packing and not moe else 0
    if args.packing and moe:
        log.info("--packing 1 is ignored with --use_moe 1 (its load-balancing loss is per sequence)")
    raw = model
    if args.use_compile:
        raw.model.compile()  # the decoder stack; image splicing and the sparse loss stay eager
    if env.ddp:
        # The frozen tower needs no syncing; RoPE tables are constant, so no per-step buffer broadcast.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.named_parameters() if n.startswith(VISION_PREFIX)]
            + [n for n, _ in model.named_buffers() if n.startswith(VISION_PREFIX)])
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                        **no_buffer_sync)

    tracker = open_tracker(args.use_wandb and env.main, args.wandb_project,
                           f"{args.save_weight}-{hidden}-bs{args.batch_size}-lr{args.learning_rate}", vars(args), tracker_id)
    progress = Progress(env.main, total, min(pos.step, total), metrics_file, resumed=state is not None, tracker=tracker)
    bad = BadRowStats(dataset.path.name)

    def save(epoch: int, samples: int, step: int) -> None:
        rng = [ckpt.rng_state()]
        if env.ddp:
            rng = [None] * env.world
            dist.all_gather_object(rng, ckpt.rng_state())
        if env.main:
            save_weights(raw, weights_out)
            ckpt.save_resume(resume_file, raw, optimizer, scaler, rng, epoch=epoch, samples=samples, step=step,
                             world_size=env.world, batch_size=args.batch_size,
                             accumulation_steps=args.accumulation_steps, seed=args.seed,
                             tracker_id=getattr(tracker, "id", None), args={k: str(v) for k, v in vars(args).items()})

    step, t_start = pos.step, time.perf_counter()
    run_samples = run_tokens = 0
    window = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, samples, tokens (this rank)
    loss_sum = torch.zeros((), device=env.device)
    t_window, finished = time.perf_counter(), step >= total
    if finished:
        progress.message(f"nothing to do: {resume_file} is already at step {step} of {total}")
    stop = StopRequest()
    try:
        model.train()
        for epoch in range(pos.epoch, args.epochs):
            if finished:
                break
            loader = make_loader(dataset, args.batch_size, env.rank, env.world, args.seed, epoch,
                                 pos.samples if epoch == pos.epoch else 0, args.num_workers, env.device.type == "cuda",
                                 group_by_length=bool(args.group_by_length), pack_len=pack_len)
            skip = loader.sampler.skip * args.batch_size
            n_batches, samples = len(loader), skip
            bad.reset()
            for micro, batch in enumerate(loader):
                bad.update(batch)
                last = (micro + 1) % args.accumulation_steps == 0 or micro + 1 == n_batches
                sync = model.no_sync() if env.ddp and not last else nullcontext()
                with sync:
                    loss = batch_loss(model, raw, batch, env.device, autocast, cache)
                    scaler.scale(loss / args.accumulation_steps).backward()
                loss_sum += loss.detach()
                window += torch.tensor([0.0, 1.0, len(batch["index"]), float(batch["attention_mask"].sum())],
                                       dtype=torch.float64)
                samples = skip + (micro + 1) * args.batch_size * env.world
                if not last:
                    continue
                optimizer_step(optimizer, scaler, params, args.grad_clip, get_lr(step, total, args.learning_rate))
                step += 1
                progress.advance()
                finished = step >= total
                end_of_epoch = micro + 1 == n_batches
                stopping = stop.flag and not env.ddp
                if step % args.log_interval == 0 or finished or end_of_epoch or stopping:
                    window[0] = loss_sum.item()
                    stats = window.to(env.device)
                    flag = torch.tensor([float(stop.flag)], dtype=torch.float64, device=env.device)
                    if env.ddp:
                        dist.all_reduce(stats)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stats, dt = stats.cpu(), time.perf_counter() - t_window
                    run_samples += int(stats[2])
                    run_tokens += int(stats[3])
                    progress.log(dict(step=step, epoch=epoch + 1, loss=float(stats[0] / stats[1]),
                                      lr=get_lr(step - 1, total, args.learning_rate),
                                      samples_per_s=float(stats[2]) / dt, tokens_per_s=float(stats[3]) / dt))
                    window.zero_()
                    loss_sum.zero_()
                    t_window = time.perf_counter()
                    stopping = bool(flag.item())
                if env.main and eval_due(args, step, finished):  # the other ranks wait at their next all-reduce
                    progress.record(score_record(raw, dataset.tokenizer, args, step, autocast))
                if step % args.save_interval == 0 or finished or end_of_epoch or stopping:
                    save(epoch, samples, step)
                if stopping:
                    progress.message(f"stopped on request at step {step}; continue with --from_resume 1 ({resume_file})")
                    finished = True
                if finished:
                    break
            if env.ddp:  # each rank skipped the bad rows of its own share: report them all
                shares = [None] * env.world
                dist.all_gather_object(shares, bad.rows)
                bad.merge(shares)
            if env.main:
                progress.message(f"epoch {epoch + 1}/{args.epochs}: {bad.summary()}")
    finally:
        stop.close()

    digest = weights_digest(raw)
    digests = [digest]
    if env.ddp:
        digests = [None] * env.world
        dist.all_gather_object(digests, digest)
    elapsed = time.perf_counter() - t_start
    summary = dict(time_s=round(elapsed, 2), steps=step, samples=run_samples, tokens=run_tokens,
                   samples_per_s=round(run_samples / max(elapsed, 1e-9), 2),
                   tokens_per_s=round(run_tokens / max(elapsed, 1e-9), 1),
                   peak_memory_mb=round(peak_memory_mb(env.device), 1), bad_rows_last_epoch=bad.counts(),
                   weights=str(weights_out),
                   rank_weight_sha256=digests)
    progress.close(summary)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    if env.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def main(stage: str, argv: list[str] | None = None) -> dict[str, Any]:
    return train(build_parser(stage).parse_args(argv))
