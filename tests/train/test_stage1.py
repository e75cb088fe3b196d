"""Stage-1 training on the bundled phage lambda genome (real sequence): the loss falls, an interrupted
and resumed run equals an uninterrupted one bitwise, checkpoints hold no pickle (the
`vqdna train-tokenizer` command: tests/commands/test_train_tokenizer.py)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vqdna.data import bundled_fasta, read_fasta
from vqdna.models.tokenizer_model import VQDNATokenizerModel
from vqdna.train.stage1 import GenomeWindows, Stage1Config, train_tokenizer

LAMBDA = bundled_fasta("lambda.fa.gz")
TINY = dict(dim=16, depth=2, mlp_ratio=2, taps=(1, 2), codebook_sizes=(8, 32))


def _cfg(out, **kw):
    base = dict(
        genomes=[LAMBDA], out=str(out), config="vqdna-small", config_overrides=TINY, steps=6, batch_size=4,
        warmup_steps=3, warmup_seq_len=32, seq_len=64, log_every=1, save_every=1000, progress=False,
    )
    return Stage1Config(**{**base, **kw})


def _metrics(path):
    return [json.loads(line) for line in open(path)]


def _lambda_ids():
    return next(read_fasta(LAMBDA)).ids


def test_windows_are_real_sequence_and_seeded(tmp_path):
    windows = GenomeWindows([LAMBDA], cache=str(tmp_path))
    assert windows.total == 48502
    a = windows.sample(5, 100, 1)
    assert torch.equal(a, windows.sample(5, 100, 1)) and not torch.equal(a, windows.sample(5, 100, 2))
    assert a.shape == (5, 100) and a.dtype == torch.int64 and int(a.max()) <= 4
    whole = torch.from_numpy(_lambda_ids().astype("int64"))
    for row in a:  # every window is a substring of the genome
        hits = (whole.unfold(0, 100, 1) == row).all(1)
        assert bool(hits.any())


def test_tiny_run_lowers_the_loss(tmp_path):
    train_tokenizer(_cfg(tmp_path, steps=25, warmup_steps=4, lr=1e-2, batch_size=8))
    m = _metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m] == list(range(1, 26))
    first = sum(r["recon_loss"] for r in m[:3]) / 3
    last = sum(r["recon_loss"] for r in m[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert m[-1]["recon_acc"] > 0.6 and m[-1]["seq_len"] == 64 and m[0]["seq_len"] == 32
    assert all(u > 0.5 for u in m[-1]["usage"])
    model = VQDNATokenizerModel.from_pretrained(tmp_path)  # the trained tokenizer
    assert model.config.dim == 16 and model.tokenizer_sha256


def test_the_recipe(tmp_path, monkeypatch):
    """The stage-1 recipe of docs/design.md: AdamW (0.9, 0.98) with weight decay on weight matrices and kernels
    only, linear warm-up then cosine decay to 0, warm-up-length windows during warm-up only, and one k-means
    re-initialisation of the codebooks right after the last warm-up step."""
    import vqdna.train.stage1 as stage1

    seen = {"steps": 0, "reinit_after": []}

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, groups, **kw):
            seen["groups"], seen["kw"] = groups, kw
            super().__init__(groups, **kw)

        def step(self, *a, **kw):
            seen["steps"] += 1
            return super().step(*a, **kw)

    reinit = stage1._reinit_codebooks
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(stage1, "_reinit_codebooks", lambda *a: (seen["reinit_after"].append(seen["steps"]), reinit(*a)))
    cfg = _cfg(tmp_path, lr=1e-2, weight_decay=0.05)
    _, model = train_tokenizer(cfg, return_model=True)
    assert seen["kw"]["betas"] == (0.9, 0.98) and seen["kw"]["lr"] == 1e-2
    decay, no_decay = seen["groups"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert seen["reinit_after"] == [3]  # once, after the 3 warm-up steps
    m = _metrics(tmp_path / "metrics.jsonl")
    assert [r["seq_len"] for r in m] == [32, 32, 32, 64, 64, 64]
    want = [1e-2 * k / 3 if k < 3 else 1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 3) / 3)) for k in range(1, 7)]
    assert [r["lr"] for r in m] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("interrupt_at", [3, 5], ids=["before-kmeans-reinit", "after-reinit"])
def test_resume_equals_uninterrupted(tmp_path, interrupt_at):
    train_tokenizer(_cfg(tmp_path / "straight"))
    train_tokenizer(_cfg(tmp_path / "resumed", stop_after=interrupt_at))
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # interrupted: no final model yet
    ckpt = tmp_path / "resumed" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == interrupt_at
    torch.manual_seed(12345)  # a different global RNG state must not matter: the checkpoint restores it
    train_tokenizer(_cfg(tmp_path / "resumed", resume=True))
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    oa = load_file(tmp_path / "straight" / "checkpoint" / "optimizer.safetensors")
    ob = load_file(ckpt / "optimizer.safetensors")
    for key in oa:
        assert torch.equal(oa[key], ob[key]), key
    straight = _metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = _metrics(tmp_path / "resumed" / "metrics.jsonl")
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed
    ]


def test_resume_with_other_schedule_is_an_error(tmp_path):
    train_tokenizer(_cfg(tmp_path, steps=4, stop_after=2))
    with pytest.raises(ValueError, match="4-step schedule"):
        train_tokenizer(_cfg(tmp_path, steps=5, resume=True))


def _ddp_worker(rank, world, port, out, result_dir):
    import os

    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        _, model = train_tokenizer(_cfg(out, steps=5, warmup_steps=2, batch_size=4), return_model=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(result_dir, f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_rank_training_keeps_replicas_identical(tmp_path):
    """torchrun-style run on two CPU processes (gloo): DDP averages gradients, the quantizer syncs
    codebooks, k-means re-init and dead-code restarts, so both replicas end bitwise equal."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0 = load_file(tmp_path / "rank0.safetensors")
    r1 = load_file(tmp_path / "rank1.safetensors")
    for key in r0:
        if not key.endswith("recent_counts"):  # usage monitoring is per rank by design
            assert torch.equal(r0[key], r1[key]), f"replicas drifted apart on {key}"
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for key in saved:
        assert torch.equal(saved[key], r0[key]), key
    assert len(_metrics(tmp_path / "run" / "metrics.jsonl")) == 5  # rank 0 logs alone
