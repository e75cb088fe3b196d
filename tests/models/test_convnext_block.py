"""The fused native ConvNeXt block (csrc/ops/convnext_block/cpu.cpp) against its spec
(vqdna.models.convnext.convnext_block_reference), and where the encoder runs it."""

import os

import pytest
import torch

from vqdna import _ext
from vqdna.models.convnext import (
    ConvNeXt1dEncoder, ConvNeXtBlock1d, _runs_native, convnext_block_reference, native_block_available,
)

pytestmark = pytest.mark.skipif(
    not _ext.extension_available() and os.environ.get("VQDNA_ALLOW_NO_EXT") == "1", reason="pure-Python install"
)


def _block(dim, kernel_size, mlp_ratio, seed):
    # Layer scale ~1 (not 1e-6) so the block's branch, not the residual, dominates the comparison.
    torch.manual_seed(seed)
    block = ConvNeXtBlock1d(dim, kernel_size, mlp_ratio, layer_scale_init=1.0)
    with torch.no_grad():
        for p in (block.dwconv.bias, block.norm.weight, block.norm.bias, block.gamma):
            p.normal_()
    return block


def _native(block, x, keep, tile_rows=0):
    return torch.ops.vqdna.convnext_block_native(
        x, keep, block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias, block.norm.eps,
        block.pwconv1.weight, block.pwconv1.bias, block.pwconv2.weight, block.pwconv2.bias, block.gamma, tile_rows,
    )


def test_op_is_built():
    assert native_block_available(), "vqdna._C has no vqdna::convnext_block_native: rebuild the extension"


# (B, L, D, kernel_size, mlp_ratio, tile_rows): odd and tiny channel counts, records shorter than the
# kernel, and tiles (0: the default 512) that split records so tile edges fall inside the halo.
SHAPES = [
    (1, 1, 1, 3, 1, 0), (2, 2, 3, 7, 4, 1), (1, 5, 5, 7, 2, 2), (3, 7, 17, 5, 4, 3), (2, 70, 64, 7, 4, 16),
    (1, 129, 65, 3, 3, 0), (2, 600, 33, 7, 4, 0), (1, 1100, 12, 9, 4, 0), (2, 300, 384, 7, 4, 100),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch,length,dim,kernel_size,mlp_ratio,tile_rows", SHAPES)
def test_matches_reference(batch, length, dim, kernel_size, mlp_ratio, tile_rows, masked, rng):
    block = _block(dim, kernel_size, mlp_ratio, seed=length * dim)
    x = torch.randn(batch, length, dim, generator=rng)
    keep = torch.rand(batch, length, generator=rng) > 0.3 if masked else None
    with torch.no_grad():
        got, want = _native(block, x, keep, tile_rows), convnext_block_reference(block, x, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if keep is not None:
        assert (got[~keep] == 0).all()


def test_rejects_bad_inputs():
    block = _block(8, 7, 4, seed=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="convnext_block: x must be float32"):
        _native(block, torch.zeros(1, 4, 8, dtype=torch.float64), None)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dw_weight must be"):
        _native(block, torch.zeros(1, 4, 9), None)
    with torch.no_grad(), pytest.raises(RuntimeError, match="keep must be"):
        _native(block, torch.zeros(1, 4, 8), torch.ones(1, 5, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(RuntimeError, match="tile_rows must be"):
        _native(block, torch.zeros(1, 4, 8), None, -1)


def test_encoder_runs_native_only_without_autograd(monkeypatch, rng):
    enc = ConvNeXt1dEncoder(16, 2, taps=(1, 2), layer_scale_init=1.0)
    ids = torch.randint(0, 6, (2, 50), generator=rng)
    x = torch.zeros(1, 3, 16)
    assert not _runs_native(enc.blocks[0], x)  # grad enabled: the module's ops (autograd)
    with torch.no_grad():
        assert _runs_native(enc.blocks[0], x)
        fused = enc(ids)
        monkeypatch.setenv("VQDNA_BACKEND", "reference")
        assert not _runs_native(enc.blocks[0], x)
        spec = enc(ids)
    for got, want in zip(fused, spec):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got[ids == 5] == 0).all()
