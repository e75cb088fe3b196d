"""Training checkpoints (vqdna.train.checkpoint): a run resumed from one takes the very steps the
uninterrupted run takes (model, optimizer, scheduler and RNG restored); only safetensors and JSON are
written; a save cut short never leaves a directory that looks complete."""

import os

import pytest
import torch

from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel
from vqdna.train import checkpoint

CONFIG = dict(dim=8, depth=1, taps=(1,), codebook_sizes=(4,))


def _parts(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def _steps(model, optimizer, scheduler, n):
    """n steps of a loss on fresh random inputs (drawn from torch's RNG, so a lost RNG state shows)."""
    for _ in range(n):
        ids = torch.randint(0, 4, (2, 16))
        loss = sum(z.square().mean() for z in model.encoder(ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_takes_the_same_steps(tmp_path):
    torch.manual_seed(0)
    model = VQDNATokenizerModel(VQDNATokenizerConfig(**CONFIG))
    optimizer, scheduler = _parts(model)
    _steps(model, optimizer, scheduler, 2)
    state = {"step": 2, "args": {"seq_len": 16, "genomes": ["a.fa"]}}
    checkpoint.save_checkpoint(str(tmp_path), model, optimizer, scheduler, state)
    straight = _steps(model, optimizer, scheduler, 3)

    torch.manual_seed(123)  # other RNG state and other weights: the checkpoint must bring back both
    resumed = VQDNATokenizerModel.from_pretrained(str(tmp_path))
    optimizer, scheduler = _parts(resumed)
    assert checkpoint.load_checkpoint(str(tmp_path), optimizer, scheduler) == state
    assert scheduler.last_epoch == 2
    again = _steps(resumed, optimizer, scheduler, 3)
    assert straight.keys() == again.keys()
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], rtol=0, atol=0, msg=name)
    assert {os.path.splitext(f)[1] for f in os.listdir(tmp_path)} <= {".json", ".safetensors"}


def test_an_interrupted_save_does_not_look_complete(tmp_path, monkeypatch):
    model = VQDNATokenizerModel(VQDNATokenizerConfig(**CONFIG))
    optimizer, scheduler = _parts(model)
    checkpoint.save_checkpoint(str(tmp_path), model, optimizer, scheduler, {"step": 0})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save_checkpoint(str(tmp_path), model, optimizer, scheduler, {"step": 1})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no complete checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path), optimizer, scheduler)
