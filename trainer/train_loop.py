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

Reading order: `train` at the bottom checks every input file up front (`check_prerequisites`),
`setup` builds the model, data and optimizer (and `restore`s a resume file), `train_epoch` runs the
steps, logging a `Window` of summed metrics (`log_window`) and saving (`save`); `finish` writes the summary.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.readers import BenchError
from benchmarks.training import add_eval_args, check_eval_data, score_record
from benchmarks.training import due as eval_due
from model import DATA_DIR, DEFAULT_CLIP, DEFAULT_TOKENIZER, OUT_DIR, resolve
from model.argtypes import int_range, non_negative_int, positive_float, positive_int
from model.files import remove_stale_temporaries
from model.load import parse_weight_name
from model.model_minimind import segment_attention_mask
from model.model_vlm import MiniMindVLM, VLMConfig
from model.processor import MiniMindVLMProcessor, has_tokenizer, load_tokenizer, vision_geometry
from model.weights import (
    SHAPE_FLAGS,
    VISION_PREFIX,
    WeightError,
    check_shape,
    infer_shape,
    load_weights,
    read_state_dict,
    save_weights,
    weight_path,
)
from trainer import checkpoint as ckpt
from trainer.checkpoint import ResumeFileError
from trainer.data import RankSampler, make_loader
from trainer.feature_cache import FeatureCache, FeatureCacheMismatch, fingerprint
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
    a("--epochs", type=positive_int, default=d["epochs"])
    a("--batch_size", type=positive_int, default=d["batch_size"], help="rows per micro-batch per process")
    a("--learning_rate", type=positive_float, default=d["learning_rate"], help="peak learning rate (cosine to a tenth of it)")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="under torchrun: cuda:LOCAL_RANK")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="CUDA autocast dtype (float16 adds a GradScaler); the CPU always trains in float32")
    a("--num_workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), help="data-loader worker processes")
    a("--accumulation_steps", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=positive_float, default=1.0, help="max global gradient norm")
    a("--log_interval", type=positive_int, default=100, help="optimizer steps between metrics records")
    a("--save_interval", type=positive_int, default=100,
      help="optimizer steps between weight + resume saves (also at every epoch end)")
    a("--hidden_size", type=positive_int, default=None,
      help="default: the --from_weight file's (read from its tensors), else 512")
    a("--num_hidden_layers", type=positive_int, default=None, help="default: the --from_weight file's, else 8")
    a("--max_seq_len", type=positive_int, default=d["max_seq_len"], help="rows are truncated to this many tokens")
    a("--use_moe", type=int, default=None, choices=[0, 1], help="default: the --from_weight file's, else 0")
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
    a("--seed", type=int_range(0, 2**31 - 1), default=42, help="model init and data order; the run is a function of it")
    a("--max_steps", type=non_negative_int, default=0, help="stop after this many optimizer steps in all (0: run every epoch); "
      "the schedule then spans max_steps")
    a("--group_by_length", type=int, default=0, choices=[0, 1],
      help="1: batches of rows of similar length (less padding, but correlated batches: see the README)")
    a("--packing", type=int, default=1, choices=[0, 1],
      help="1: pack each batch's rows into sequences of at most --max_seq_len tokens (the same rows, less "
      "padding; attention never crosses rows); 0: pad every row to the batch's longest")
    a("--feature_cache", default=None, help="folder for an on-disk cache of the frozen encoder's features "
      "(worth it from the second epoch on)")
    a("--ddp_timeout", type=positive_int, default=1800,
      help="seconds a rank waits in a collective before DDP gives up (torch's NCCL default is 600); rank 0's "
      "scoring (--eval_data) and saves make the others wait, so a long --eval_limit may need more")
    add_eval_args(p)
    return p


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """What a run writes into --save_dir."""
    weights: Path  # {save_weight}_{hidden}{_moe}.pth
    resume: Path  # ..._resume.pth
    metrics: Path  # ..._metrics.jsonl

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunFiles:
        save_dir, moe = Path(args.save_dir).expanduser(), bool(args.use_moe)
        weights = weight_path(save_dir, args.save_weight, args.hidden_size, moe)
        return cls(weights, ckpt.resume_path(save_dir, args.save_weight, args.hidden_size, moe),
                   weights.with_name(weights.stem + "_metrics.jsonl"))


def from_weight_path(name: str, save_dir: Path, hidden: int, moe: bool) -> Path | None:
    """--from_weight: none, a file path, or a name looked up in --save_dir (the original ignored --save_dir)."""
    if name.lower() == "none":
        return None
    p = Path(name).expanduser()
    if p.suffix in (".pth", ".safetensors") or p.is_file():
        return resolve(p)
    return weight_path(save_dir, name, hidden, moe)


SMALL_V = {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": 0}  # MiniMind2-Small-V, the published default


def settle_shape(args: argparse.Namespace) -> None:
    """Fill in the size flags left out: from the --from_weight file's tensors when there is one (a size
    flag that was given must agree with it: one line naming both), else MiniMind2-Small-V's. The file
    is looked up as --from_weight does: `{save_dir}/{name}_{hidden}{_moe}.pth`, hidden 512 unless given,
    else the only `{name}_*.pth` there."""
    given = {k: getattr(args, k) for k in SHAPE_FLAGS}
    weights = None
    if args.from_weight.lower() != "none":
        hidden = SMALL_V["hidden_size"] if args.hidden_size is None else args.hidden_size
        weights = from_weight_path(args.from_weight, Path(args.save_dir).expanduser(), hidden, bool(args.use_moe))
        if weights is not None and not weights.is_file() and args.hidden_size is None:
            named = [p for p in weights.parent.glob(f"{args.from_weight}_*.pth")
                     if parse_weight_name(p).get("weight") == args.from_weight
                     and args.use_moe in (None, parse_weight_name(p)["use_moe"])]
            weights = named[0] if len(named) == 1 else weights
    if weights is not None and weights.is_file():
        shape = infer_shape(read_state_dict(weights), weights)
        check_shape(shape, given, weights)
        for k in SHAPE_FLAGS:
            given[k] = int(shape[k]) if given[k] is None else given[k]
    for k in SHAPE_FLAGS:
        setattr(args, k, SMALL_V[k] if given[k] is None else given[k])


class MissingPrerequisites(FileNotFoundError):
    """Every missing input of a run, one line each; the scripts print it and exit with status 2."""

    def __init__(self, problems: list[str]):
        super().__init__("missing prerequisites:\n" + "\n".join(f"  {p}" for p in problems))


def check_prerequisites(args: argparse.Namespace, files: RunFiles) -> None:
    """Raise MissingPrerequisites naming every input file or folder that is not there, with its fix."""
    problems, save_dir = [], files.weights.parent
    weights = from_weight_path(args.from_weight, save_dir, args.hidden_size, bool(args.use_moe))
    resuming = args.from_resume and files.resume.is_file()  # then the resume file holds the weights
    if weights is not None and not resuming and not weights.is_file():
        problems.append(f"weights: {weights} not found (python scripts/download.py weights, train the previous "
                        f"stage into --save_dir {save_dir}, pass a file path, or --from_weight none)")
    data = resolve(args.data_path)
    if not data.is_file():
        problems.append(f"data: {data} not found (python scripts/download.py data, or --data_path FILE)")
    elif data.suffix == ".jsonl":
        from dataset.lm_dataset import default_image_root
        images = resolve(args.images_path) if args.images_path else default_image_root(data)
        if not images.is_dir():
            problems.append(f"images: {images} not found (the image folder of {data.name}: --images_path DIR)")
    clip = resolve(args.vision_model_path)
    if not (clip / "config.json").is_file():
        problems.append(f"vision encoder: no CLIP model at {clip} (python scripts/download.py clip, "
                        f"python scripts/make_tiny_clip.py for an offline stand-in, or --vision_model_path DIR)")
    tokenizer = resolve(args.tokenizer_path)
    if not has_tokenizer(tokenizer):
        problems.append(f"tokenizer: none at {tokenizer} (python scripts/download.py tokenizer, "
                        f"or --tokenizer_path model/tokenizer for the project's own)")
    if args.eval_data and not resolve(args.eval_data).exists():
        problems.append(f"eval data: {resolve(args.eval_data)} not found (python scripts/download.py bench NAME, "
                        f"or leave out --eval_data)")
    if problems:
        raise MissingPrerequisites(problems)


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


def setup_distributed(device: str, timeout_s: int = 1800) -> Env:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (single- and multi-node alike); plain python does not."""
    if "RANK" not in os.environ:
        return Env(0, 0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
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




def build_model(args: argparse.Namespace, env: Env, weights: Path | None) -> MiniMindVLM:
    tower = resolve(args.vision_model_path)  # the model's image geometry is the tower's own
    config = VLMConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                       use_moe=bool(args.use_moe), **vision_geometry(tower))
    model = MiniMindVLM(config, vision_model_path=tower)
    if weights is not None:
        load_weights(model, weights)
    set_trainable(model, args.freeze_llm)
    return model.to(env.device)


def build_data(args: argparse.Namespace, env: Env, config: VLMConfig) -> tuple[Any, FeatureCache | None, RankSampler]:
    """(dataset, feature cache or None, the epoch geometry of this rank); rows are rendered with the
    model's processor, so image slots have the length of the model's vision tower."""
    from dataset.lm_dataset import VLMDataset
    processor = MiniMindVLMProcessor.from_config(config, load_tokenizer(resolve(args.tokenizer_path)))
    dataset = VLMDataset(resolve(args.data_path), processor, max_length=args.max_seq_len,
                         image_root=resolve(args.images_path) if args.images_path else None)
    cache = None
    if args.feature_cache:
        cache = FeatureCache(Path(args.feature_cache).expanduser(), fingerprint(dataset.path, resolve(args.vision_model_path)))
    geometry = RankSampler(dataset.lengths(show_progress=env.main), args.batch_size, env.rank, env.world, args.seed,
                           bool(args.group_by_length))
    return dataset, cache, geometry


def restore(state: dict[str, Any], path: Path, model: MiniMindVLM, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, env: Env, args: argparse.Namespace, geometry: RankSampler) -> Position:
    """Load a resume file's model, optimizer, scaler and RNG states; returns where to continue (the
    same sample even when the world size or batch size changed since the save)."""
    ckpt.restore_model(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    pos = resume_position(state["epoch"], state["samples"], geometry.epoch_samples, args.batch_size, env.world,
                          args.accumulation_steps, geometry.batches_per_rank)
    same_geometry = (state["world_size"], state["batch_size"], state["accumulation_steps"]) == (
        env.world, args.batch_size, args.accumulation_steps)
    rng = state["rng"]
    ckpt.set_rng_state(rng[env.rank] if same_geometry and len(rng) == env.world else rng[0])
    log.info("resumed from %s: epoch %d, sample %d of %d, step %d%s", path, pos.epoch + 1, pos.samples,
             geometry.epoch_samples, pos.step, "" if same_geometry else
             f" (saved with world size {state['world_size']}, batch {state['batch_size']}: continuing at the same sample)")
    return pos


def wrap_ddp(model: MiniMindVLM, env: Env) -> DistributedDataParallel:
    # The frozen tower needs no syncing; RoPE tables are constant, so no per-step buffer broadcast.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in model.named_parameters() if n.startswith(VISION_PREFIX)]
        + [n for n, _ in model.named_buffers() if n.startswith(VISION_PREFIX)])
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                   **no_buffer_sync)


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
@dataclass
class Window:
    """This rank's sums over the micro-batches since the last metrics record."""
    loss_sum: torch.Tensor  # 0-d, on the device while summing: adding a step's loss needs no host sync
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0  # real tokens (padding excluded)
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, batch: dict) -> None:
        self.loss_sum += loss.detach()
        self.micro_batches += 1
        self.samples += len(batch["index"])
        self.tokens += int(batch["attention_mask"].sum())

    def all_reduce(self, env: Env, stop: bool) -> tuple[Window, bool]:
        """(the sums of every rank, whether any rank was asked to stop), in one all-reduce."""
        stats = torch.tensor([self.loss_sum.item(), self.micro_batches, self.samples, self.tokens, float(stop)],
                             dtype=torch.float64, device=env.device)
        if env.ddp:
            dist.all_reduce(stats)
        loss_sum, micro_batches, samples, tokens, stops = stats.tolist()
        return Window(torch.tensor(loss_sum, dtype=torch.float64), int(micro_batches), int(samples), int(tokens),
                      self.started), stops > 0

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.micro_batches = self.samples = self.tokens = 0
        self.started = time.perf_counter()


@dataclass
class Run:
    """A training run: what `setup` builds, and the counters the epochs advance."""
    args: argparse.Namespace
    env: Env
    files: RunFiles
    raw: MiniMindVLM  # the model itself (checkpoints, scoring)
    model: torch.nn.Module  # what the forward goes through: `raw`, or its DDP wrapper
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    dataset: Any  # VLMDataset
    cache: FeatureCache | None
    pack_len: int  # 0: pad each batch to its longest row
    total: int  # optimizer steps of the whole run (the schedule's T)
    start: Position  # where this process starts (0 unless resumed)
    progress: Progress
    tracker: Any
    bad: Any  # BadRowStats of the current epoch
    window: Window
    step: int = 0
    samples_seen: int = 0  # over all ranks, by this process's run
    tokens_seen: int = 0
    started: float = field(default_factory=time.perf_counter)


def setup(args: argparse.Namespace, env: Env, files: RunFiles) -> Run:
    seed_everything(args.seed + env.rank)
    autocast, scaler = precision(args.dtype, env.device)
    log.info("%d process(es) on %s, %s", env.world, env.device, "fp32" if isinstance(autocast, nullcontext)
             else f"{autocast.fast_dtype} autocast" + (" + GradScaler" if scaler.is_enabled() else ""))
    if env.main:
        files.weights.parent.mkdir(parents=True, exist_ok=True)
        for p in (files.weights, files.resume, files.metrics):
            remove_stale_temporaries(p)
    check_eval_data(args)

    state = ckpt.load_resume(files.resume) if args.from_resume and files.resume.is_file() else None
    if args.from_resume and state is None:
        log.info("--from_resume 1: no %s yet, starting fresh", files.resume)
    moe = bool(args.use_moe)
    init = None if state is not None else from_weight_path(args.from_weight, files.weights.parent, args.hidden_size, moe)
    raw = build_model(args, env, init)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    n_all = sum(p.numel() for n, p in raw.named_parameters() if not n.startswith(VISION_PREFIX))
    log.info("model: %.2fM parameters (vision encoder excluded), %.3fM trainable (--freeze_llm %d: %s)",
             n_all / 1e6, sum(p.numel() for p in params) / 1e6, args.freeze_llm, FREEZE_CHOICES[args.freeze_llm])

    dataset, cache, geometry = build_data(args, env, raw.config)
    spe = steps_per_epoch(geometry.batches_per_rank, args.accumulation_steps)
    total = args.epochs * spe if not args.max_steps else min(args.epochs * spe, args.max_steps)
    start, tracker_id = Position(0, 0, 0), None
    if state is not None:
        start = restore(state, files.resume, raw, optimizer, scaler, env, args, geometry)
        tracker_id = state.get("tracker_id")

    # MoE's load-balancing loss is taken per sequence, so packing would change it: MoE trains padded.
    pack_len = args.max_seq_len if args.packing and not moe else 0
    if args.packing and moe:
        log.info("--packing 1 is ignored with --use_moe 1 (its load-balancing loss is per sequence)")
    if args.use_compile:
        raw.model.compile()  # the decoder stack; image splicing and the sparse loss stay eager
    model = wrap_ddp(raw, env) if env.ddp else raw

    tracker = open_tracker(args.use_wandb and env.main, args.wandb_project,
                           f"{args.save_weight}-{args.hidden_size}-bs{args.batch_size}-lr{args.learning_rate}",
                           vars(args), tracker_id)
    progress = Progress(env.main, total, min(start.step, total), files.metrics, resumed=state is not None,
                        tracker=tracker)
    from dataset.lm_dataset import BadRowStats
    return Run(args, env, files, raw, model, params, optimizer, scaler, autocast, dataset, cache, pack_len, total,
               start, progress, tracker, BadRowStats(dataset.path.name),
               Window(torch.zeros((), device=env.device)), step=start.step)


def train_epoch(run: Run, epoch: int, stop: StopRequest) -> bool:
    """One epoch (the rest of it, when resumed in it); True when the run is over: its last step
    done, or a stop asked for."""
    args, env = run.args, run.env
    loader = make_loader(run.dataset, args.batch_size, env.rank, env.world, args.seed, epoch,
                         run.start.samples if epoch == run.start.epoch else 0, args.num_workers,
                         env.device.type == "cuda", group_by_length=bool(args.group_by_length), pack_len=run.pack_len)
    skip = loader.sampler.skip * args.batch_size  # samples of the epoch consumed before this run
    n_batches, finished = len(loader), False
    run.bad.reset()
    for micro, batch in enumerate(loader):
        run.bad.update(batch)
        last = (micro + 1) % args.accumulation_steps == 0 or micro + 1 == n_batches  # of an accumulation group
        with run.model.no_sync() if env.ddp and not last else nullcontext():  # all-reduce gradients once a group
            loss = batch_loss(run.model, run.raw, batch, env.device, run.autocast, run.cache)
            run.scaler.scale(loss / args.accumulation_steps).backward()
        run.window.add(loss, batch)
        if not last:
            continue
        optimizer_step(run.optimizer, run.scaler, run.params, args.grad_clip, get_lr(run.step, run.total, args.learning_rate))
        run.step += 1
        run.progress.advance()
        finished = run.step >= run.total
        end_of_epoch = micro + 1 == n_batches
        stopping = stop.flag and not env.ddp  # under DDP the ranks agree on stopping at the next record
        if run.step % args.log_interval == 0 or finished or end_of_epoch or stopping:
            stopping = log_window(run, epoch, stop.flag)
        if env.main and eval_due(args, run.step, finished):  # the others wait at their next all-reduce (--ddp_timeout)
            run.progress.record(score_record(run.raw, run.dataset.tokenizer, args, run.step, run.autocast))
        if run.step % args.save_interval == 0 or finished or end_of_epoch or stopping:
            save(run, epoch, samples=skip + (micro + 1) * args.batch_size * env.world)
        if stopping:
            run.progress.message(f"stopped on request at step {run.step}; continue with --from_resume 1 "
                                 f"({run.files.resume})")
            finished = True
        if finished:
            break
    report_bad_rows(run, epoch)
    return finished


def log_window(run: Run, epoch: int, stop: bool) -> bool:
    """One metrics record of the window's sums over every rank; returns whether any rank was asked to stop."""
    totals, stopping = run.window.all_reduce(run.env, stop)
    seconds = time.perf_counter() - totals.started
    run.samples_seen += totals.samples
    run.tokens_seen += totals.tokens
    run.progress.log(dict(step=run.step, epoch=epoch + 1, loss=float(totals.loss_sum) / totals.micro_batches,
                          lr=get_lr(run.step - 1, run.total, run.args.learning_rate),
                          samples_per_s=totals.samples / seconds, tokens_per_s=totals.tokens / seconds))
    run.window.reset()
    return stopping


def save(run: Run, epoch: int, samples: int) -> None:
    """The weight file and the resume file (rank 0 writes them; every rank's RNG state goes in)."""
    args, env = run.args, run.env
    rng = [ckpt.rng_state()]
    if env.ddp:
        rng = [None] * env.world
        dist.all_gather_object(rng, ckpt.rng_state())
    if env.main:
        save_weights(run.raw, run.files.weights)
        ckpt.save_resume(run.files.resume, run.raw, run.optimizer, run.scaler, rng, epoch=epoch, samples=samples,
                         step=run.step, world_size=env.world, batch_size=args.batch_size,
                         accumulation_steps=args.accumulation_steps, seed=args.seed,
                         tracker_id=getattr(run.tracker, "id", None), args={k: str(v) for k, v in vars(args).items()})


def report_bad_rows(run: Run, epoch: int) -> None:
    if run.env.ddp:  # each rank skipped the bad rows of its own share: report them all
        shares = [None] * run.env.world
        dist.all_gather_object(shares, run.bad.rows)
        run.bad.merge(shares)
    run.progress.message(f"epoch {epoch + 1}/{run.args.epochs}: {run.bad.summary()}")


def finish(run: Run) -> dict[str, Any]:
    """The closing summary; fails when DDP ranks ended with different weights."""
    env = run.env
    digest = weights_digest(run.raw)
    digests = [digest]
    if env.ddp:
        digests = [None] * env.world
        dist.all_gather_object(digests, digest)
    elapsed = time.perf_counter() - run.started
    summary = dict(time_s=round(elapsed, 2), steps=run.step, samples=run.samples_seen, tokens=run.tokens_seen,
                   samples_per_s=round(run.samples_seen / max(elapsed, 1e-9), 2),
                   tokens_per_s=round(run.tokens_seen / max(elapsed, 1e-9), 1),
                   peak_memory_mb=round(peak_memory_mb(env.device), 1), bad_rows_last_epoch=run.bad.counts(),
                   weights=str(run.files.weights), rank_weight_sha256=digests)
    run.progress.close(summary)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    if env.ddp:
        # Drop the DDP wrapper while every rank's process group is still up: freed after
        # destroy_process_group, it could hang a gloo rank at exit (seen in tests/test_train_ddp.py).
        run.model = run.raw
        dist.barrier()
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    settle_shape(args)  # the sizes decide the file names, so they come first
    files = RunFiles.of(args)
    check_prerequisites(args, files)  # before any process group: every rank sees the same files
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = setup_distributed(args.device, args.ddp_timeout)
    if not env.main:
        logging.getLogger().setLevel(logging.WARNING)
    run = setup(args, env, files)
    finished = run.step >= run.total
    if finished:
        run.progress.message(f"nothing to do: {files.resume} is already at step {run.step} of {run.total}")
    stop = StopRequest()
    try:
        run.model.train()
        for epoch in range(run.start.epoch, args.epochs):
            if finished:
                break
            finished = train_epoch(run, epoch, stop)
    finally:
        stop.close()
    return finish(run)


def main(stage: str, argv: list[str] | None = None) -> dict[str, Any]:
    return train(build_parser(stage).parse_args(argv))


def cli(stage: str) -> None:
    """The scripts' entry point: `main`, with a problem the user can fix (missing inputs, a weight
    file of another size, an unusable resume file, cache or benchmark file) printed without a
    traceback and exit status 2; under torchrun by the first process of each machine only."""
    try:
        main(stage)
    except (MissingPrerequisites, WeightError, ResumeFileError, FeatureCacheMismatch, BenchError) as e:
        # Every process finds the same problem. The first one on each machine reports it and fails the run;
        # the others leave quietly (status 0), so torchrun cannot stop the reporter before it has printed.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(e if isinstance(e, MissingPrerequisites) else f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
