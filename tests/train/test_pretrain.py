"""Stage 2 (vqdna/train/pretrain.py): masking statistics, windows, collator, a tiny pre-training with
checkpoint resume, and its outputs loading through the Auto classes."""

import math
import shutil

import numpy as np
import pytest
import torch

from tests.train import _mlm
from tests.train._mlm import one_thread  # noqa: F401  (autouse)
from vqdna.models.bert import CLS, MASK, PAD, SEP, build_inputs, special_ids
from vqdna.train.pretrain import CodeWindows, MLMCollator, mask_tokens

SIZES = [8, 32]


def test_mask_tokens_statistics(rng):
    b, n = 64, 250
    codes = [torch.stack([torch.randint(0, k, (n - (i % 7),), generator=rng) for k in SIZES], 1) for i in range(b)]
    ids, mask = build_inputs(codes, SIZES)
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, SIZES, 0.25, generator=g)
    real = ids[..., 0] < SIZES[0]
    chosen = labels[..., 0] != -100
    # only real code positions are chosen; CLS / SEP / PAD never; all levels chosen together
    assert not (chosen & ~real).any() and ((labels != -100) == chosen[..., None]).all()
    n_real, n_chosen = int(real.sum()), int(chosen.sum())
    sd = math.sqrt(n_real * 0.25 * 0.75)
    assert abs(n_chosen - 0.25 * n_real) < 5 * sd
    # labels are the original codes; unchosen positions are untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    # 80% [MASK] in every level, 10% random codes, 10% kept
    is_mask = (out == torch.tensor(special_ids(SIZES, MASK))).all(-1) & chosen
    changed = chosen & ~is_mask & (out != ids).any(-1)
    kept = chosen & (out == ids).all(-1)
    sd = math.sqrt(n_chosen * 0.1 * 0.9)
    assert abs(int(is_mask.sum()) - 0.8 * n_chosen) < 5 * math.sqrt(n_chosen * 0.16)
    # a random replacement equals the original with probability 1 / (8 * 32): counted as kept
    assert abs(int(changed.sum()) - 0.1 * n_chosen * (1 - 1 / 256)) < 5 * sd
    assert abs(int(kept.sum()) - 0.1 * n_chosen * (1 + 1 / 256)) < 5 * sd
    # random codes: valid codes of each level, spread over the codebook
    rand = out[changed]
    for l, k in enumerate(SIZES):
        assert rand[:, l].min() >= 0 and rand[:, l].max() < k
        assert torch.unique(rand[:, l]).numel() == k
    # specials stay in place
    assert torch.equal(out[:, 0], ids[:, 0]) and (out[~mask.bool()] == torch.tensor(special_ids(SIZES, PAD))).all()


def test_mask_tokens_probability_extremes():
    ids, _ = build_inputs([torch.zeros(5, 2, dtype=torch.long)], SIZES)
    out, labels = mask_tokens(ids, SIZES, 0.0)
    assert torch.equal(out, ids) and (labels == -100).all()
    out, labels = mask_tokens(ids, SIZES, 1.0)
    assert (labels[0, 1:6] == 0).all() and (labels[0, [0, 6]] == -100).all()


def test_code_windows_cover_records():
    records = [("a", np.arange(10).reshape(5, 2)), ("b", np.zeros((0, 2))), ("c", np.arange(14).reshape(7, 2))]
    w = CodeWindows(records, window=3)
    got = [w[j] for j in range(len(w))]
    assert [len(x) for x in got] == [3, 2, 3, 3, 1]
    assert torch.equal(torch.cat(got[:2]), torch.arange(10).reshape(5, 2))
    assert torch.equal(torch.cat(got[2:]), torch.arange(14).reshape(7, 2))
    assert got[0].dtype == torch.int64
    with pytest.raises(ValueError, match="window"):
        CodeWindows(records, window=0)


def test_collator_batches():
    batch = MLMCollator(SIZES)([torch.zeros(5, 2, dtype=torch.long) + 1, torch.zeros(9, 2, dtype=torch.long) + 2])
    assert batch["input_ids"].shape == (2, 16, 2) and batch["labels"].shape == (2, 16, 2)
    assert batch["attention_mask"].sum(1).tolist() == [7, 11]
    assert batch["input_ids"][1, 0].tolist() == special_ids(SIZES, CLS)
    assert batch["input_ids"][1, 10].tolist() == special_ids(SIZES, SEP)


def test_collator_masks_follow_the_seed_and_the_batch():
    """seed=int: a batch's masks depend on the run's seed and the batch's codes only - the same after other
    draws from torch's global RNG (a resume, another DataLoader worker), different for another seed."""
    g = torch.Generator().manual_seed(3)
    codes = [torch.stack([torch.randint(0, k, (60,), generator=g) for k in SIZES], 1) for _ in range(4)]
    first = MLMCollator(SIZES, seed=0)(codes)
    torch.manual_seed(1234)
    torch.rand(100)
    again = MLMCollator(SIZES, seed=0)(codes)
    other = MLMCollator(SIZES, seed=1)(codes)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"] != -100, other["labels"] != -100)
    moved = MLMCollator(SIZES, seed=0)([codes[1], codes[0], codes[2], codes[3]])
    assert not torch.equal(first["labels"] != -100, moved["labels"] != -100)


def test_tiny_pretrain_learns_saves_and_resumes(tmp_path):
    from transformers import AutoModelForMaskedLM

    from vqdna.models.bert import VQDNAForMaskedLM
    from vqdna.models.hf_tokenizer import VQDNATokenizer
    from vqdna.train.pretrain import masked_accuracy, pretrain

    out, trainer = _mlm.pretrained()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 30 and len(losses) == 6
    assert losses[-1] < losses[0]
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert type(model) is VQDNAForMaskedLM and model.config.num_hidden_layers == 2
    tok = _mlm.tokenizer()
    # the codebooks are the tokenizer's, and the saved tokenizer encodes like the original
    for a, b in zip(model.vqdna.embeddings.codebooks, tok.model.codebooks):
        assert torch.equal(a, b.float())
    assert model.config.tokenizer_sha256 == tok.tokenizer_sha256
    again = VQDNATokenizer.from_pretrained(out)
    seqs = ["ACGTTGCA" * 5, "GGGCCCAT"]
    assert torch.equal(again(seqs, padding=True, return_tensors="pt")["input_ids"],
                       tok(seqs, padding=True, return_tensors="pt")["input_ids"])
    # better than an untrained model at the masked positions (level 0: 8 codes)
    records = _mlm.code_records()[:16]
    trained = masked_accuracy(model, records, tok.codebook_sizes, max_length=64)
    fresh = masked_accuracy(VQDNAForMaskedLM(model.config), records, tok.codebook_sizes, max_length=64)
    assert trained[0] > fresh[0] + 0.05, (trained, fresh)
    # a second run in the same folder (a copy: the cached model stays the 30-step one other tests use)
    # resumes from the step-30 checkpoint
    out = shutil.copytree(out, tmp_path / "mlm")
    resumed = pretrain(records, tok, str(out), config="bert-tiny", steps=35, batch_size=16, max_length=64, lr=2e-3,
                       warmup_steps=3, logging_steps=5, save_steps=15, extra_args={"disable_tqdm": True})
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert resumed.state.global_step == 35 and steps[0] == 5 and steps[-1] == 35


def test_the_recipe():
    """Stage 2's recipe (docs/design.md): AdamW (0.9, 0.98, eps 1e-6), weight decay 0.01, gradients clipped at
    norm 1, linear warm-up then cosine decay to min_lr (1e-6), windows of max_length - 2 codes (CLS and SEP
    make max_length tokens), the window length saved in the config."""
    _, trainer = _mlm.pretrained()  # 30 steps, lr 2e-3, 3 warm-up steps, max_length 64
    args = trainer.args
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay, args.max_grad_norm) == \
        (0.9, 0.98, 1e-6, 0.01, 1.0)
    lrs = [(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]
    # a step's logged rate is the one it used: after the 3 warm-up steps, cosine from 2e-3 down to min_lr
    cosine = lambda done: 1e-6 + (2e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (done - 3) / (30 - 3)))  # noqa: E731
    assert [s for s, _ in lrs] == [5, 10, 15, 20, 25, 30]
    assert [lr for _, lr in lrs] == pytest.approx([cosine(s - 1) for s, _ in lrs], rel=1e-4)
    windows = trainer.train_dataset
    assert max(len(windows[j]) for j in range(len(windows))) == 62
    assert trainer.model.config.train_max_length == 64


def test_machine_args_follow_the_machine(monkeypatch):
    """machine_args: bf16 and pinned batches only with a GPU (bf16 where it is supported, unless the caller
    says), and a CPU torchrun world gets use_cpu and gloo (without them each rank would train alone)."""
    from vqdna.train.pretrain import machine_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine_args() == {"bf16": False, "dataloader_pin_memory": False}
    assert machine_args(True)["bf16"] is True
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert machine_args() == {"bf16": False, "dataloader_pin_memory": False, "use_cpu": True, "ddp_backend": "gloo"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert machine_args() == {"bf16": supported, "dataloader_pin_memory": True}  # GPUs: NCCL, the default
    assert machine_args(False)["bf16"] is False


@pytest.mark.slow
def test_pretrain_ddp_two_ranks_gloo(tmp_path):
    """`torchrun --nproc_per_node 2 vqdna pretrain` on CPU (gloo): one model written, the global batch split."""
    import json
    import os
    import subprocess
    import sys

    from vqdna.data import bundled_fasta
    from vqdna.streaming import tokenize_files

    tok = _mlm.tokenizer()
    tokenize_files([bundled_fasta()], str(tmp_path / "tokens"), tok.model, window=4096, device="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "vqdna.cli", "pretrain", "--tokens", str(tmp_path / "tokens"), "--tokenizer", f"{_mlm.ROOT}/stage1",
           "--config", "bert-tiny", "--out", str(tmp_path / "mlm"), "--steps", "4", "--batch-size", "8",
           "--max-length", "32", "--warmup-steps", "1", "--save-steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "info"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "mlm" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 4  # per rank: 8 / 2
    # one world of two ranks (ranks that each believed they were alone would each report a batch of 4)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "mlm" / "model.safetensors").exists() and (tmp_path / "mlm" / "vqdna_tokenizer.json").exists()


def test_resume_refuses_another_tokenizer(tmp_path):
    """check_resume_tokenizer: a checkpoint of a run started with the bundled vqdna-small refuses the test
    tokenizer, naming both (the bundled one also by name; test_onthefly's CLI test: a folder by its path);
    its own passes."""
    import json

    from vqdna.models.tokenizer_model import VQDNATokenizerModel
    from vqdna.train.pretrain import ResumeError, check_resume_tokenizer

    small = VQDNATokenizerModel.from_pretrained("vqdna-small").tokenizer_sha256
    tok = _mlm.tokenizer()
    for name, sha in (("a", small), ("b", tok.tokenizer_sha256), ("c", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"tokenizer_sha256": sha}))
    with pytest.raises(ResumeError) as err:
        check_resume_tokenizer(str(tmp_path / "a"), tok)
    assert f"the run started with tokenizer sha256 {small} (bundled 'vqdna-small')" in str(err.value)
    assert f"the given tokenizer is sha256 {tok.tokenizer_sha256}; pass the run's tokenizer" in str(err.value)
    check_resume_tokenizer(str(tmp_path / "b"), tok)
    check_resume_tokenizer(str(tmp_path / "c"), tok)  # a run of an unsaved tokenizer recorded none to check
