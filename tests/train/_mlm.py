"""Shared, cached set-up for the stage-2/3 tests: a tiny random stage-1 tokenizer, synthetic DNA (GC-rich vs
AT-rich: learnable from codes, chance MCC 0) and a tiny pre-trained masked LM. Built once per test session
in a temporary folder; nothing from outside the repository."""

import atexit
import functools
import shutil
import tempfile

import numpy as np
import pytest
import torch

from vqdna.models.tokenizer_model import VQDNATokenizerConfig, VQDNATokenizerModel
from vqdna.models.hf_tokenizer import VQDNATokenizer

ROOT = tempfile.mkdtemp(prefix="vqdna-mlm-tests-")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one torch thread: with two, thread hand-offs dominate, and on a
    shared 2-core machine spinning threads slow these tests down several times. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


def gc_sequences(n, length, seed):
    """n random sequences, label 1 = GC-rich (P(G or C) 0.65), 0 = AT-rich (0.35), balanced."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    seqs = []
    for y in labels:
        gc = 0.65 if y else 0.35
        seqs.append("".join(rng.choice(list("ACGT"), p=[(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2], size=length)))
    return seqs, labels.tolist()


@functools.lru_cache(None)
def tokenizer() -> VQDNATokenizer:
    """A random (untrained) HRQ tokenizer, codebooks of 8 and 32 codes, saved so it has a sha256."""
    torch.manual_seed(0)
    cfg = VQDNATokenizerConfig(dim=16, depth=2, mlp_ratio=2, quantizer="hrq", taps=(1, 2), codebook_sizes=(8, 32))
    model = VQDNATokenizerModel(cfg)
    model.save_pretrained(f"{ROOT}/stage1")
    return VQDNATokenizer(model, model_max_length=64)


@functools.lru_cache(None)
def code_records():
    """Pre-training records (name, codes [n, 2] uint16): 48 sequences of 150-300 bases, mixed GC."""
    rng = np.random.default_rng(1)
    seqs = [gc_sequences(1, int(rng.integers(150, 300)), seed=i)[0][0] for i in range(48)]
    codes = tokenizer().encode_codes(seqs)
    return [(f"seq{i}", c.numpy().astype(np.uint16)) for i, c in enumerate(codes)]


@functools.lru_cache(None)
def pretrained():
    """(folder, trainer) of a 30-step bert-tiny pre-training on code_records()."""
    from vqdna.train.pretrain import pretrain

    out = f"{ROOT}/mlm"
    trainer = pretrain(code_records(), tokenizer(), out, config="bert-tiny", steps=30, batch_size=16, max_length=64,
                       lr=2e-3, warmup_steps=3, logging_steps=5, save_steps=15, extra_args={"disable_tqdm": True})
    return out, trainer


def write_gue(folder, sizes=(160, 80, 80), length=60, labels=None):
    """A GUE-format task folder (train/dev/test.csv) of GC-rich vs AT-rich sequences."""
    import os

    os.makedirs(folder, exist_ok=True)
    for s, (split, n) in enumerate(zip(("train", "dev", "test"), sizes)):
        seqs, y = gc_sequences(n, length, seed=100 + s)
        if labels is not None:
            y = labels(seqs)
        with open(f"{folder}/{split}.csv", "w") as f:
            f.write("sequence,label\n" + "".join(f"{q},{v}\n" for q, v in zip(seqs, y)))
    return folder
