"""Stage 2: masked-LM pre-training of VQDNAForMaskedLM on token files, on transformers.Trainer.

Records of a token dataset (ds[i] -> (name, codes [length, n_levels])) are cut into windows of
max_length - 2 codes (CLS and SEP complete a window). Masking follows BERT with the paper's 25%: a
chosen position is replaced in every level by [MASK] (80%), by random codes (10%) or kept (10%); the
labels are its original codes. AdamW (0.9, 0.98), weight decay 0.01, lr 5e-4 with linear warm-up and
cosine decay to 1e-6; bf16 on GPUs that support it; DDP under torchrun (--batch-size is the global
batch); checkpoints every save_steps and an automatic resume from the newest one in the output folder.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from vqdna.models.bert import MASK, VQDNAConfig, VQDNAForMaskedLM, build_inputs, special_ids

log = logging.getLogger(__name__)


def window_starts(lengths, window: int, min_length: int = 1) -> np.ndarray:
    """(record, start) int64 [windows, 2]: starts 0, window, 2 * window, ... of every record of
    `lengths` positions (records shorter than min_length skipped). The one window layout of CodeWindows
    (token files) and vqdna.train.onthefly.GenomeWindows (raw sequences), so both number windows alike."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    index = []
    for i, n in enumerate(np.asarray(lengths, dtype=np.int64).reshape(-1)):
        starts = np.arange(0, n, window) if n >= min_length else np.zeros(0, np.int64)
        index.append(np.stack([np.full(len(starts), i), starts], 1))
    return np.concatenate(index).astype(np.int64) if index else np.zeros((0, 2), np.int64)


class CodeWindows(Dataset):
    """Windows of at most `window` codes over the records of `records` (ds[i] -> (name, codes
    [length, n_levels])); item j -> int64 codes [n, n_levels]. Records shorter than min_length codes
    are skipped. Record lengths come from `records.lengths` when present, else are read once here."""

    def __init__(self, records, window: int, min_length: int = 1):
        self.records, self.window = records, window
        lengths = getattr(records, "lengths", None)  # TokenDataset knows them without reading codes
        if lengths is None:
            lengths = [len(records[i][1]) for i in range(len(records))]
        self.index = window_starts(lengths, window, min_length)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> torch.Tensor:
        i, start = self.index[j]
        codes = np.asarray(self.records[int(i)][1][start : start + self.window])
        return torch.from_numpy(codes.astype(np.int64))


def mask_tokens(input_ids: torch.Tensor, codebook_sizes, mlm_probability: float = 0.25, generator=None):
    """BERT masking over whole positions. input_ids [B, L, n_levels] int64 (CLS/SEP/PAD never chosen).

    Returns (masked input_ids, labels [B, L, n_levels] with -100 where not chosen). Of the chosen
    positions 80% become [MASK] in every level, 10% random codes (drawn per level), 10% stay.
    """
    sizes = torch.tensor(codebook_sizes, device=input_ids.device)
    candidates = input_ids[..., 0] < sizes[0]
    shape = input_ids.shape[:2]
    chosen = (torch.rand(shape, generator=generator, device=input_ids.device) < mlm_probability) & candidates
    labels = torch.where(chosen[..., None], input_ids, -100)
    action = torch.rand(shape, generator=generator, device=input_ids.device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    out = input_ids.clone()
    out[to_mask] = torch.tensor(special_ids(codebook_sizes, MASK), device=input_ids.device)
    rand = (torch.rand(*shape, len(sizes), generator=generator, device=input_ids.device) * sizes).long()
    out = torch.where(to_random[..., None], rand, out)
    return out, labels


class MLMCollator:
    """list of code tensors [n_i, n_levels] -> {"input_ids", "attention_mask", "labels"} (CLS/SEP added,
    padded to a multiple of 8, masked by mask_tokens).

    seed: None draws the masks from torch's global RNG. An int draws them from a generator seeded by
    (seed, the batch's codes), so a batch's masks depend on nothing but the run's seed and the batch:
    the same in DataLoader workers, on every rank, and after a resume (the Trainer's data loader collates
    one batch ahead, so the global RNG state a checkpoint saves is already past the next batch's masks)."""

    def __init__(self, codebook_sizes, mlm_probability: float = 0.25, pad_to_multiple_of: int = 8,
                 seed: int | None = None):
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed = seed

    def __call__(self, features):
        input_ids, mask = build_inputs(features, self.codebook_sizes, pad_to_multiple_of=self.pad_to_multiple_of)
        generator = None
        if self.seed is not None:
            digest = hashlib.blake2b(input_ids.numpy().tobytes(), digest_size=8, key=str(self.seed).encode())
            generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        input_ids, labels = mask_tokens(input_ids, self.codebook_sizes, self.mlm_probability, generator=generator)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def open_token_dataset(path):
    """The stage-1 token files in `path` as a dataset (vqdna.data.TokenDataset)."""
    from vqdna.data.tokens import TokenDataset

    return TokenDataset(path)


def build_model(config: str | VQDNAConfig, tokenizer_model, **overrides) -> VQDNAForMaskedLM:
    """A fresh VQDNAForMaskedLM of named size `config` embedding through `tokenizer_model`'s codebooks."""
    if isinstance(config, str):
        config = VQDNAConfig.named(
            config, codebook_sizes=list(tokenizer_model.config.codebook_sizes),
            codebook_dim=int(tokenizer_model.codebooks[0].shape[1]),
            tokenizer_sha256=tokenizer_model.tokenizer_sha256, **overrides,
        )
    model = VQDNAForMaskedLM(config)
    model.set_codebooks([c.detach().float().cpu() for c in tokenizer_model.codebooks])
    return model


def pretrain(
    records,
    tokenizer,
    out_dir: str,
    config: str | VQDNAConfig = "bert-base",
    steps: int = 100_000,
    batch_size: int = 256,
    max_length: int = 256,
    lr: float = 5e-4,
    min_lr: float = 1e-6,
    warmup_steps: int | float = 10_000,
    mlm_probability: float = 0.25,
    weight_decay: float = 0.01,
    seed: int = 0,
    resume: bool = True,
    logging_steps: int = 50,
    save_steps: int = 1000,
    num_workers: int = 0,
    bf16: bool | None = None,
    model_overrides: dict | None = None,
    extra_args: dict | None = None,
    prefetch: bool = True,
    encode_threads: int | None = None,
):
    """Masked-LM pre-training; saves the model (safetensors) and the tokenizer in out_dir.

    records: ds[i] -> (name, codes [length, n_levels]) (e.g. vqdna.data.TokenDataset), or a
    vqdna.data.SequenceIndex of raw genomes tokenized on the fly (same windows, same codes; see
    vqdna.train.onthefly); tokenizer: the VQDNATokenizer whose stage-1 model produced (or produces) the
    codes. out_dir also gets training_data.json (write_training_data). batch_size is global (split over the
    torchrun world). prefetch (with num_workers 0): a background thread makes the next batch (the on-the-fly
    encode included; on a GPU on a side stream) while the step runs, with encode_threads CPU threads
    (None: vqdna.train.prefetch.default_encode_threads). Same batches, same order, either way.
    Returns the transformers Trainer (trainer.state.log_history holds the losses; trainer.data_path says
    how the batches were made).
    """
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ValueError(f"global batch size {batch_size} is not divisible by the world size {world}")
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (CLS, one code, SEP), got {max_length}")
    model = build_model(config, tokenizer.model, train_max_length=max_length, **(model_overrides or {}))
    encode_device = _encode_device(num_workers)
    train, collator = training_windows(records, tokenizer.model, max_length - 2, model.config.codebook_sizes,
                                       mlm_probability, seed=seed, encode_device=encode_device)
    if len(train) == 0:
        raise ValueError("the token dataset holds no codes" if isinstance(train, CodeWindows) else "the genomes hold no bases")
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size // world,
        learning_rate=lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": min_lr},
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        dataloader_num_workers=num_workers,
        remove_unused_columns=False,
        report_to="none",
        ddp_find_unused_parameters=False,
        **{**machine_args(bf16), **(extra_args or {})},
    )
    last = get_last_checkpoint(out_dir) if resume and os.path.isdir(out_dir) else None
    if last:
        check_resume_tokenizer(last, tokenizer)
        log.warning("resuming from %s", last)
    data_path = _data_path(collator, num_workers, prefetch, encode_device, encode_threads)
    if data_path["overlap"] == "prefetch thread":
        from vqdna.train.prefetch import prefetching_trainer

        Trainer = prefetching_trainer(Trainer, device=encode_device, threads=data_path["threads"])
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.data_path = data_path
    log.info("batches: %s", ", ".join(f"{k} {v}" for k, v in data_path.items()))
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(out_dir)
    if trainer.is_world_process_zero():
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(out_dir)
        write_training_data(out_dir, records, tokenizer, max_length - 2, seed, data_path)
    return trainer


TRAINING_DATA = "training_data.json"


def _encode_device(num_workers: int) -> str:
    """Where the on-the-fly encode runs: this rank's GPU when the collator runs in this process (CUDA
    cannot be used in forked DataLoader workers), else the CPU (in the workers, overlapping the step)."""
    if torch.cuda.is_available() and num_workers == 0:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def training_windows(records, tokenizer_model, window: int, codebook_sizes, mlm_probability: float = 0.25,
                     seed: int | None = None, encode_device="cpu"):
    """(dataset, collator) for the Trainer: CodeWindows + MLMCollator over token files, or, when
    `records` is a vqdna.data.SequenceIndex of raw genomes, GenomeWindows (halo = the tokenizer's
    receptive radius) + OnTheFlyMLMCollator, which encodes each batch in the data path (DataLoader
    workers when num_workers > 0) into the codes `vqdna tokenize` writes. Both number windows alike."""
    from vqdna.data.index import SequenceIndex

    if isinstance(records, SequenceIndex):
        from vqdna.train.onthefly import GenomeWindows, OnTheFlyMLMCollator

        return (GenomeWindows(records, window, halo=tokenizer_model.receptive_radius),
                OnTheFlyMLMCollator(tokenizer_model, codebook_sizes, mlm_probability, seed=seed, device=encode_device))
    return CodeWindows(records, window), MLMCollator(codebook_sizes, mlm_probability, seed=seed)


def _data_path(collator, num_workers: int, prefetch: bool, encode_device: str, encode_threads: int | None) -> dict:
    """How the batches are made (logged, kept as trainer.data_path, written to training_data.json):
    overlap "prefetch thread" / "dataloader workers" / "none"; with on-the-fly encode its device and dtype."""
    from vqdna.train.prefetch import default_encode_threads

    path = {"overlap": "dataloader workers" if num_workers > 0 else "prefetch thread" if prefetch else "none"}
    if path["overlap"] == "prefetch thread":
        on_cpu = not encode_device.startswith("cuda")
        path["threads"] = (encode_threads or default_encode_threads()) if on_cpu else None
    encoder = getattr(collator, "encoder", None)
    if encoder is not None:
        path.update(encode_device=str(encoder.device), encode_dtype=encoder.dtype)
    return path


class ResumeError(ValueError):
    """A checkpoint in the output folder does not belong to this run's set-up."""


def check_resume_tokenizer(checkpoint: str, tokenizer) -> None:
    """Refuses (ResumeError) to resume from `checkpoint` with a tokenizer other than the one the run started
    with (the sha256 its config.json records): the codes, and so the windows' meaning, would change."""
    import json

    with open(os.path.join(checkpoint, "config.json")) as f:
        want = json.load(f).get("tokenizer_sha256")
    have = tokenizer.tokenizer_sha256
    if want and want != have:
        raise ResumeError(
            f"cannot resume from {checkpoint}: the run started with tokenizer {_describe_tokenizer(want)}, the given "
            f"tokenizer is {_describe_tokenizer(have, tokenizer)}; pass the run's tokenizer, or start afresh "
            f"(--no-resume / resume=False, or another output folder)")


def bundled_tokenizer_with(sha256: str | None) -> str | None:
    """The name of the bundled tokenizer whose weights have this sha256, or None."""
    from vqdna.models.tokenizer_model import VQDNATokenizerModel, bundled_tokenizers

    for name in bundled_tokenizers() if sha256 else ():
        if VQDNATokenizerModel.from_pretrained(name).tokenizer_sha256 == sha256:
            return name
    return None


def _describe_tokenizer(sha: str | None, tokenizer=None) -> str:
    """'sha256 X' plus where it comes from: the given tokenizer's path, or the bundled name with those weights."""
    if sha is None:
        return "an unsaved tokenizer (no sha256)"
    where = getattr(getattr(tokenizer, "model", None), "name_or_path", None) if tokenizer is not None else None
    if not where:
        name = bundled_tokenizer_with(sha)
        where = name and f"bundled {name!r}"
    return f"sha256 {sha}" + (f" ({where})" if where else "")


def write_training_data(out_dir: str, records, tokenizer, window: int, seed: int, data_path: dict | None = None) -> None:
    """out_dir/training_data.json: what the model was trained on (the inputs with their fingerprints:
    the genomes' size/mtime/end hashes, or the token files' manifest), the tokenizer's identity
    (sha256 of its weights, receptive radius), the window layout and seed that fix the sampling, and
    how the batches were made (data_path: overlap, encode device and dtype)."""
    import json

    from vqdna.data.index import SequenceIndex

    model = tokenizer.model
    if isinstance(records, SequenceIndex):
        data = {"source": "genomes", "inputs": records.inputs, "records": len(records.lengths),
                "bases": int(records.total)}
    else:
        manifest = getattr(records, "manifest", None)
        data = {"source": "tokens", "directory": getattr(records, "directory", None), "manifest": manifest,
                "records": len(records)}
    data.update({"tokenizer": {"sha256": model.tokenizer_sha256, "receptive_radius": int(model.receptive_radius),
                               "codebook_sizes": [int(k) for k in model.config.codebook_sizes]},
                 "window": int(window), "seed": int(seed), "data_path": data_path})
    with open(os.path.join(out_dir, TRAINING_DATA), "w") as f:
        json.dump(data, f, indent=1, default=str)


def machine_args(bf16: bool | None = None) -> dict:
    """The TrainingArguments that follow from this machine, for both trainers (pre-training, fine-tuning): bf16
    where a GPU supports it (unless `bf16` says otherwise), pinned batches only with a GPU (pinning is for
    host-to-GPU copies; on a CPU it only warns), and cpu_ddp_args."""
    cuda = torch.cuda.is_available()
    if bf16 is None:
        bf16 = cuda and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "dataloader_pin_memory": cuda, **cpu_ddp_args()}


def cpu_ddp_args() -> dict:
    """TrainingArguments for a torchrun world without CUDA: use_cpu and the gloo backend, else none (GPUs:
    transformers' NCCL default). Without them transformers 5 leaves every CPU rank believing it is alone:
    each trains the whole run by itself and all of them write the output directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return {"use_cpu": True, "ddp_backend": "gloo"}
    return {}


def masked_accuracy(model, records, codebook_sizes, max_length=256, batch_size=32, mlm_probability=0.25, seed=0):
    """Per-level accuracy of the MLM at masked positions on windows of `records` (no grad, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    windows = CodeWindows(records, max_length - 2)
    correct = torch.zeros(len(codebook_sizes))
    total = 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            feats = [windows[j] for j in range(start, min(start + batch_size, len(windows)))]
            ids, mask = build_inputs(feats, codebook_sizes)
            ids, labels = mask_tokens(ids, codebook_sizes, mlm_probability, generator=g)
            logits = model(ids.to(device), mask.to(device)).logits
            chosen = labels[..., 0] != -100
            total += int(chosen.sum())
            for l, lg in enumerate(logits):
                correct[l] += (lg.argmax(-1).cpu()[chosen] == labels[..., l][chosen]).sum()
    return (correct / max(total, 1)).tolist()

