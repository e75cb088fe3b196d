"""Stage 1: train the VQ-VAE / HRQ tokenizer on genome windows (docs/design.md §1).

Recipe: AdamW (0.9, 0.98), weight decay 0.01 (on weight matrices and convolution kernels), cosine
learning rate with linear warm-up (transformers' schedule), windows of 128 bases during warm-up then
256, one repeated-k-means re-initialisation of the codebooks on encoder outputs right after warm-up,
EMA codebooks with dead-code restarts (the quantizer's), bf16 autocast on CUDA. Under torchrun every
rank trains on its own windows (global batch = --batch-size whatever the number of ranks), gradients
are averaged by DDP and the codebook statistics by the quantizer's all_reduce.

Windows are a pure function of (seed, step, rank), so a resumed run sees exactly the windows of an
uninterrupted one; with the checkpointed model, optimizer, scheduler and RNG state it reproduces it
bitwise on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vqdna.kernels.reference import BASE_PAD_ID
from vqdna.models.tokenizer_model import NAMED_CONFIGS, VQDNATokenizerConfig, VQDNATokenizerModel
from vqdna.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Stage1Config", "GenomeWindows", "train_tokenizer", "default_lr"]


def default_lr(config_name: str) -> float:
    """The paper's 1e-4 is for D=384 over a long schedule; the small model trains for a few thousand
    steps on a CPU, where 2e-3 (still stable with layer scale and warm-up) converges far faster."""
    return 1e-4 if config_name.startswith("vqdna-base") else 2e-3


@dataclasses.dataclass
class Stage1Config:
    genomes: Sequence[str]
    out: str
    config: str = "vqdna-small"
    steps: int = 1000
    batch_size: int = 32  # global, split over ranks
    lr: Optional[float] = None  # None: default_lr(config)
    warmup_steps: Optional[int] = None  # None: steps // 10
    warmup_seq_len: int = 128
    seq_len: int = 256
    weight_decay: float = 0.01
    seed: int = 0
    resume: bool = False
    metrics: Optional[str] = None  # JSONL file (default: out/metrics.jsonl)
    log_every: int = 10
    save_every: int = 500
    kmeans_windows: Optional[int] = None  # windows encoded for the re-init (None: 64 * max K tokens)
    config_overrides: dict = dataclasses.field(default_factory=dict)
    progress: bool = True
    index_cache: Optional[str] = None  # SequenceIndex cache directory (default: out/seqidx)
    stop_after: Optional[int] = None  # checkpoint and stop at this step (an interruption, for tests)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.config)

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)


class GenomeWindows:
    """Training windows from FASTA files through `vqdna.data.SequenceIndex` (decoded once into a
    memory-mapped cache, so genomes need not fit in memory and every torchrun rank shares it).

    sample(n, length, seed) -> ids [n, length] int64 (0..4, 5 = pad past a short record's end): a
    record drawn with probability proportional to its length, the start uniformly; windows without a
    single A/C/G/T (N runs) are redrawn. The windows are a pure function of the seed.
    """

    def __init__(self, paths: Sequence[str], cache: str):
        from vqdna.data import SequenceIndex

        if not paths:
            raise ValueError("GenomeWindows: no FASTA files given")
        self.index = SequenceIndex.build([os.fspath(p) for p in paths], cache=cache)
        self.total = self.index.total
        if self.total == 0:
            raise ValueError(f"GenomeWindows: no sequence in {list(paths)}")

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        windows = self.index.sample_windows(n, length, rng=seed, min_acgt=1)
        return torch.from_numpy(windows.ids.astype(np.int64))


def _window_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step + 1) * 4099 + rank) % (1 << 63)


def _setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Weight matrices and conv kernels decay; biases, norms and layer scales do not.
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _reinit_codebooks(model: VQDNATokenizerModel, windows: GenomeWindows, cfg: Stage1Config, rank: int, device) -> None:
    """The one-time repeated k-means: codebooks re-fit on encoder outputs of a fresh sample."""
    n_tokens = 64 * max(model.config.codebook_sizes)
    n_windows = cfg.kmeans_windows or max(1, math.ceil(n_tokens / cfg.seq_len))
    ids = windows.sample(n_windows, cfg.seq_len, _window_seed(cfg.seed, -1, rank)).to(device)
    keep = ids < BASE_PAD_ID
    zs = [z[keep].float() for z in model.encoder(ids)]
    if model.config.quantizer == "vq":
        model.quantizer.reinit_kmeans(zs[-1])
    else:
        model.quantizer.reinit_kmeans(zs)


def _batch_metrics(out, ids: torch.Tensor) -> dict:
    keep = ids < BASE_PAD_ID
    correct = (out.logits.detach().argmax(-1) == ids) & keep
    return {
        "loss": float(out.loss.detach()),
        "recon_loss": float(out.recon_loss.detach()),
        "commit_loss": float(out.commit_loss.detach()),
        "recon_acc": float(correct.sum()) / max(1, int(keep.sum())),
    }


def train_tokenizer(cfg: Stage1Config, return_model: bool = False):
    """Run stage 1; writes cfg.out/{config.json, model.safetensors} (the trained tokenizer),
    cfg.out/checkpoint/ (resumable state) and metrics JSONL. Returns the last logged metrics (and this
    rank's model with return_model=True)."""
    from tqdm import tqdm

    rank, world, device = _setup_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")
    local_batch = cfg.batch_size // world
    lr, warmup = cfg.resolved_lr(), cfg.resolved_warmup()
    if not 0 <= warmup < cfg.steps:
        raise ValueError(f"warm-up steps ({warmup}) must be in [0, steps={cfg.steps})")
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    metrics_path = cfg.metrics or os.path.join(cfg.out, "metrics.jsonl")
    windows = GenomeWindows(cfg.genomes, cfg.index_cache or os.path.join(cfg.out, "seqidx"))

    torch.manual_seed(cfg.seed)
    if cfg.resume and os.path.isfile(os.path.join(ckpt_dir, "trainer_state.json")):
        model = VQDNATokenizerModel.from_pretrained(ckpt_dir)
        resuming = True
    else:
        if cfg.config in NAMED_CONFIGS:
            config = VQDNATokenizerConfig.named(cfg.config, **cfg.config_overrides)
        else:  # a directory or JSON file holding a config
            config = VQDNATokenizerConfig.from_pretrained(cfg.config)
            config.update(cfg.config_overrides)
        model = VQDNATokenizerModel(config)
        resuming = False
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.98))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    start = 0
    if resuming:
        state = load_checkpoint(ckpt_dir, optimizer, scheduler)
        if state["steps"] != cfg.steps:
            raise ValueError(f"{ckpt_dir}: checkpoint of a {state['steps']}-step schedule, --steps {cfg.steps} given")
        start = state["step"]
    train_model = model
    if world > 1:
        # Buffers (codebooks) are kept identical by the quantizer's own collectives.
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    is_main = rank == 0
    if is_main:
        os.makedirs(cfg.out, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and is_main), desc="stage1", dynamic_ncols=True)
    last: dict = {}
    t_last, tokens_since = time.perf_counter(), 0
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        if step == warmup and warmup > 0:
            _reinit_codebooks(model, windows, cfg, rank, device)
        seq_len = cfg.warmup_seq_len if step < warmup else cfg.seq_len
        ids = windows.sample(local_batch, seq_len, _window_seed(cfg.seed, step, rank))
        tokens_since += int((ids < BASE_PAD_ID).sum()) * world  # counted on the host: no device sync
        ids = ids.to(device, non_blocking=True)
        with autocast:
            out = train_model(ids)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            usage = model.usage()
            last = {
                "step": done, "seq_len": seq_len, "lr": scheduler.get_last_lr()[0], **_batch_metrics(out, ids),
                "usage": [round(u["used_fraction"], 4) for u in usage],
                "perplexity": [round(u["perplexity"], 2) for u in usage],
                "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
            }
            t_last, tokens_since = now, 0
            if is_main:
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['recon_acc']:.4f}", usage="/".join(f"{u:.2f}" for u in last["usage"]))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
        if is_main and (done % cfg.save_every == 0 or done == end):
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, {"step": done, "steps": cfg.steps, "args": _jsonable(cfg)})
    bar.close()
    if is_main and end == cfg.steps:
        model.save_pretrained(cfg.out)
    if dist.is_initialized():
        dist.barrier()
    return (last, model) if return_model else last


def _jsonable(cfg: Stage1Config) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dataclasses.asdict(cfg).items()}
