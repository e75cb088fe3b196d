"""ConvNeXt1d encoder/decoder: shapes, the exact receptive field per tap, padding invariance, the stem
against the spec (vqdna.kernels.reference.stem)."""

import pytest
import torch

from vqdna.kernels import reference
from vqdna.models.convnext import ConvNeXt1dDecoder, ConvNeXt1dEncoder


def _encoder(dim=8, depth=4, taps=(2, 4), stem_kernel=5, kernel_size=7, seed=0):
    # Layer scale 1 (not 1e-6) and float64, so a one-base change visibly reaches the field's edge.
    torch.manual_seed(seed)
    return ConvNeXt1dEncoder(dim, depth, stem_kernel, kernel_size, mlp_ratio=2, taps=taps, layer_scale_init=1.0).double()


@pytest.mark.parametrize("batch,length,taps", [(1, 1, (4,)), (3, 17, (1, 3, 4)), (2, 130, (2, 4))])
def test_shapes(batch, length, taps, rng):
    enc = ConvNeXt1dEncoder(12, 4, taps=taps)
    ids = torch.randint(0, 6, (batch, length), generator=rng)
    outs = enc(ids)
    assert len(outs) == len(taps)
    for z in outs:
        assert z.shape == (batch, length, 12) and z.dtype == torch.float32
        assert torch.isfinite(z).all()
        assert (z[ids == 5] == 0).all()  # pad positions zeroed
    logits = ConvNeXt1dDecoder(12, 3)(outs[-1], ids < 5)
    assert logits.shape == (batch, length, 5)


@pytest.mark.parametrize("stem_kernel,kernel_size,taps", [(5, 7, (1, 3, 4)), (3, 5, (2, 4)), (1, 3, (4,))])
@pytest.mark.parametrize("pos", [3, 40, 79])
def test_receptive_radius_exact(stem_kernel, kernel_size, taps, pos, rng):
    """Changing base `pos` changes tap outputs at exactly |t - pos| <= stem_kernel//2 + (kernel_size//2) * tap."""
    enc = _encoder(taps=taps, stem_kernel=stem_kernel, kernel_size=kernel_size)
    assert enc.receptive_radius == stem_kernel // 2 + (kernel_size // 2) * taps[-1]
    length = 80
    ids = torch.randint(0, 5, (1, length), generator=rng)
    other = ids.clone()
    other[0, pos] = (ids[0, pos] + 1 + torch.randint(0, 4, (1,), generator=rng)) % 5
    with torch.no_grad():
        before, after = enc(ids), enc(other)
    t = torch.arange(length)
    for tap, z0, z1 in zip(taps, before, after):
        radius = stem_kernel // 2 + (kernel_size // 2) * tap
        changed = (z0[0] != z1[0]).any(-1)
        expected = (t - pos).abs() <= radius
        assert torch.equal(changed, expected), f"tap {tap}: changed {changed.nonzero().flatten().tolist()}"


def test_padded_in_batch_equals_alone(rng):
    enc = _encoder()
    a = torch.randint(0, 5, (1, 37), generator=rng)
    b = torch.randint(0, 5, (1, 64), generator=rng)
    batch = torch.full((2, 64), 5)
    batch[0, :37], batch[1] = a[0], b[0]
    # Left padding too: the record sits in the middle of the row.
    shifted = torch.full((1, 64), 5)
    shifted[0, 11:48] = a[0]
    with torch.no_grad():
        alone, alone_b, together, mid = enc(a), enc(b), enc(batch), enc(shifted)
    for za, zb, zt, zm in zip(alone, alone_b, together, mid):
        torch.testing.assert_close(zt[0, :37], za[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zt[1], zb[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(zm[0, 11:48], za[0], rtol=1e-12, atol=1e-12)
        assert (zt[0, 37:] == 0).all() and (zm[0, :11] == 0).all()


@pytest.mark.parametrize("stem_kernel,kernel_size", [(5, 7), (7, 3), (1, 5)])
def test_isolation_gap_is_enough_and_tight(stem_kernel, kernel_size, rng):
    """Records `isolation_gap` pad positions apart in one row (how packing lays out short records)
    encode as each alone, although the gap is far below the receptive radius; one position less and
    the records see each other (so a packing test with the gap would catch a gap that is too small)."""
    enc = _encoder(taps=(1, 4), stem_kernel=stem_kernel, kernel_size=kernel_size)
    gap = enc.isolation_gap
    assert gap == max(stem_kernel, kernel_size) // 2 < enc.receptive_radius
    lengths = [1, 6, 2, 30, 9]
    records = [torch.randint(0, 5, (1, n), generator=rng) for n in lengths]
    with torch.no_grad():
        alone = [enc(r) for r in records]
    for g, isolated in ((gap, True), (gap - 1, False)):
        row = torch.full((1, sum(lengths) + g * len(lengths)), 5)
        cols = [sum(lengths[:i]) + g * i for i in range(len(lengths))]
        for c, r in zip(cols, records):
            row[0, c : c + r.shape[1]] = r[0]
        with torch.no_grad():
            packed = enc(row)
        same = all(
            torch.allclose(zp[0, c : c + r.shape[1]], za[0], rtol=1e-12, atol=1e-12)
            for c, r, zs in zip(cols, records, alone)
            for zp, za in zip(packed, zs)
        )
        assert same == isolated, f"gap {g}: packed {'differs from' if isolated else 'equals'} alone"


def test_mask_argument_equals_pad_ids(rng):
    enc = _encoder()
    ids = torch.randint(0, 5, (2, 50), generator=rng)
    mask = torch.rand(2, 50, generator=rng) > 0.3
    with torch.no_grad():
        by_mask = enc(ids, mask)
        by_pad = enc(torch.where(mask, ids, 5))
    for x, y in zip(by_mask, by_pad):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 4, 33])
def test_stem_equals_reference(dtype, length, rng):
    enc = ConvNeXt1dEncoder(24, 2, taps=(2,)).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        enc.stem.norm.weight.normal_(generator=rng)
        enc.stem.norm.bias.normal_(generator=rng)
    ids = torch.randint(0, 6, (3, length), generator=rng)  # pads (5) included
    s = enc.stem
    got = s(ids)
    want = reference.stem(ids, s.conv.weight, s.conv.bias, s.norm.weight, s.norm.bias, ln_eps=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)


def test_bad_ids_error():
    enc = ConvNeXt1dEncoder(8, 2, taps=(2,))
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[1, 7] = 9
    with pytest.raises(ValueError, match=r"ids\[1, 7\] = 9"):
        enc(ids)
    with pytest.raises(ValueError, match="integer"):
        enc(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="taps"):
        ConvNeXt1dEncoder(8, 4, taps=(2, 3))
