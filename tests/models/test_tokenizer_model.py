"""The tokenizer model: outputs, codes vs encode, padding invariance, checkpoints (round trip, identity,
mismatched config, missing directory), named configs, transformers Auto* registration."""

import json
import re

import pytest
import torch

import vqdna
from vqdna.models.tokenizer_model import VQDNATokenizerConfig, VQDNATokenizerModel, bundled_tokenizers


def _tiny(quantizer="hrq", seed=0, **kw):
    torch.manual_seed(seed)
    if quantizer == "hrq":
        cfg = VQDNATokenizerConfig(dim=16, depth=3, mlp_ratio=2, quantizer="hrq", taps=(1, 3), codebook_sizes=(8, 32), **kw)
    else:
        cfg = VQDNATokenizerConfig(dim=16, depth=2, mlp_ratio=2, quantizer="vq", taps=(2,), codebook_sizes=(32,), **kw)
    return VQDNATokenizerModel(cfg)


@pytest.mark.parametrize("quantizer", ["vq", "hrq"])
def test_forward_outputs(quantizer, rng):
    model = _tiny(quantizer)
    ids = torch.randint(0, 5, (3, 41), generator=rng)
    ids[1, 30:] = 5  # a shorter record
    out = model(ids)
    n_levels = 1 if quantizer == "vq" else 2
    assert model.n_levels == n_levels and len(model.codebooks) == n_levels
    assert out.logits.shape == (3, 41, 5)
    assert out.codes.shape == (3, 41, n_levels) and out.codes.dtype == torch.int64
    assert (out.codes[1, 30:] == -1).all() and (out.codes[ids < 5] >= 0).all()
    for level, k in enumerate(model.config.codebook_sizes):
        assert int(out.codes[..., level].max()) < k
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.recon_loss + out.commit_loss)
    # Reconstruction loss is the CE over real bases only.
    keep = ids < 5
    ce = torch.nn.functional.cross_entropy(out.logits[keep].float(), ids[keep])
    torch.testing.assert_close(out.recon_loss, ce)
    out.loss.backward()
    assert model.encoder.stem.conv.weight.grad is not None and model.decoder.head.weight.grad is not None
    assert all(c.grad is None for c in model.codebooks)  # codebooks move by EMA only


@pytest.mark.parametrize("quantizer", ["vq", "hrq"])
def test_encode_matches_forward_and_updates_nothing(quantizer, rng):
    model = _tiny(quantizer)
    ids = torch.randint(0, 5, (2, 60), generator=rng)
    model(ids)  # training step: k-means init + EMA
    model.eval()
    before = [c.clone() for c in model.codebooks]
    codes = model.encode(ids)
    assert codes.dtype == torch.int32 and codes.shape == (2, 60, model.n_levels)
    assert torch.equal(codes.long(), model(ids).codes)
    model.train()
    codes_again = model.encode(ids)  # encode never updates, whatever the mode
    assert torch.equal(codes, codes_again)
    for a, b in zip(before, model.codebooks):
        assert torch.equal(a, b)


def test_hrq_encode_runs_the_codes_only_op(rng, monkeypatch):
    """encode asks hrq_quantize for the codes alone (no zhat_levels written), with the forward's codes."""
    model = _tiny("hrq").eval()
    ids = torch.randint(0, 5, (2, 50), generator=rng)
    calls = []
    real = vqdna.kernels.hrq_quantize

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(vqdna.kernels, "hrq_quantize", spy)
    codes = model.encode(ids)
    assert [c.get("codes_only") for c in calls] == [True]
    assert torch.equal(codes.long(), model(ids).codes)


def test_all_pad_batch_is_finite():
    model = _tiny()
    model(torch.randint(0, 5, (1, 20)))  # initialise the codebooks
    out = model(torch.full((2, 9), 5))
    assert torch.isfinite(out.loss) and (out.codes == -1).all()


def test_padded_in_batch_encodes_as_alone(rng):
    model = _tiny(layer_scale_init=1.0).double()
    model(torch.randint(0, 5, (4, 64), generator=rng))  # k-means init so codes spread
    model.eval()
    a = torch.randint(0, 5, (1, 29), generator=rng)
    batch = torch.full((3, 50), 5)
    batch[1, 7:36] = a[0]
    batch[0] = torch.randint(0, 5, (50,), generator=rng)
    assert torch.equal(model.encode(batch)[1, 7:36], model.encode(a)[0])
    mask = torch.zeros(1, 50, dtype=torch.bool)
    mask[0, 7:36] = True
    assert torch.equal(model.encode(batch[1:2].clamp(max=4), mask)[0, 7:36], model.encode(a)[0])


@pytest.mark.parametrize("quantizer", ["vq", "hrq"])
def test_save_load_round_trip(quantizer, tmp_path, rng):
    model = _tiny(quantizer)
    ids = torch.randint(0, 5, (2, 50), generator=rng)
    for _ in range(2):
        model(ids)  # trained state (EMA buffers, initted) must survive too
    model.eval()
    assert model.tokenizer_sha256 is None
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    sha = model.tokenizer_sha256
    assert len(sha) == 64
    loaded = VQDNATokenizerModel.from_pretrained(tmp_path)
    assert loaded.tokenizer_sha256 == sha and not loaded.training
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(loaded.encode(ids), model.encode(ids))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    from transformers import AutoConfig, AutoModel

    assert type(AutoModel.from_pretrained(tmp_path)) is VQDNATokenizerModel
    assert AutoConfig.from_pretrained(tmp_path).model_type == "vqdna-tokenizer"
    # Saving again the same weights gives the same identity; other weights another one.
    loaded.save_pretrained(tmp_path / "again")
    assert loaded.tokenizer_sha256 == sha
    with torch.no_grad():
        loaded.decoder.head.bias.add_(1.0)
    loaded.save_pretrained(tmp_path / "changed")
    assert loaded.tokenizer_sha256 != sha


@pytest.mark.parametrize(
    "change",
    [dict(dim=8), dict(codebook_sizes=[8, 16]), dict(depth=2, taps=[1, 2]), dict(quantizer="vq", taps=[3], codebook_sizes=[32])],
    ids=["dim", "codebook", "depth", "quantizer"],
)
def test_mismatched_config_is_an_error(change, tmp_path):
    _tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match="do not match config.json"):
        VQDNATokenizerModel.from_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        VQDNATokenizerModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")  # config without weights
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VQDNATokenizerModel.from_pretrained(tmp_path)


def test_named_configs():
    base = VQDNATokenizerConfig.named("vqdna-base")
    assert (base.dim, base.depth, base.quantizer, tuple(base.taps), tuple(base.codebook_sizes)) == (384, 6, "hrq", (3, 6), (64, 512))
    assert base.commitment_weight == 0.9 and VQDNATokenizerConfig.named("vqdna-base-vq").commitment_weight == 0.5
    small = VQDNATokenizerConfig.named("vqdna-small", threshold_ema_dead_code=0.0)
    assert small.dim == 64 and small.depth == 4 and small.threshold_ema_dead_code == 0.0
    model = VQDNATokenizerModel(small)
    assert model.receptive_radius == 2 + 3 * 4
    with torch.device("meta"):
        assert VQDNATokenizerModel(base).receptive_radius == 2 + 3 * 6
    with pytest.raises(ValueError, match="unknown tokenizer config"):
        VQDNATokenizerConfig.named("vqdna-huge")
    with pytest.raises(ValueError, match="taps"):
        VQDNATokenizerConfig(depth=6, taps=(3, 6), codebook_sizes=(64,))
    assert vqdna.VQDNATokenizerModel is VQDNATokenizerModel and vqdna.models.VQDNATokenizerConfig is VQDNATokenizerConfig


def test_bundled_small_reconstructs_lambda():
    """The shipped tokenizer (vqdna/assets/vqdna-small) loads by name and reconstructs real sequence."""
    from vqdna.data import bundled_fasta, read_fasta

    assert "vqdna-small" in bundled_tokenizers()
    model = VQDNATokenizerModel.from_pretrained("vqdna-small")
    assert model.config.dim == 64 and model.receptive_radius == 14 and model.config.codebook_sizes == [64, 256]
    assert len(model.tokenizer_sha256) == 64
    ids = torch.from_numpy(next(read_fasta(bundled_fasta())).ids[:4096].astype("int64")).view(16, 256)
    # Without autograd, as encode runs: both then take the fused native encoder blocks, whose float32
    # rounding differs from the module ops' by an ulp, which flips a near-tie here (1 of 8192 codes,
    # the best two distances 8e-6 apart relative).
    with torch.no_grad():
        out = model(ids)
    assert (out.logits.argmax(-1) == ids).float().mean() > 0.99
    assert torch.equal(model.encode(ids).long(), out.codes)


CHECKPOINT_DAMAGES = ["truncated-weights", "garbage-weights", "no-config", "bad-config"]


def damage_checkpoint(directory, damage):
    """Damage a saved tokenizer like the probe did; returns (the exception type, the text that names
    the file) that loading it must raise."""
    weights, config = directory / "model.safetensors", directory / "config.json"
    if damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage-weights":
        weights.write_bytes(b"not a safetensors file")
    elif damage == "no-config":
        config.unlink()
        return FileNotFoundError, f"{config} does not exist"
    else:
        config.write_text("{not json")
    return ValueError, f"{weights if 'weights' in damage else config}: unreadable"


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGES)
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    """A truncated or corrupt model.safetensors was a raw SafetensorError; a missing config.json was
    reported as a weights/config mismatch. Each is now an error naming the file."""
    _tiny().save_pretrained(tmp_path)
    error, text = damage_checkpoint(tmp_path, damage)
    with pytest.raises(error, match=re.escape(text)):
        VQDNATokenizerModel.from_pretrained(tmp_path)
