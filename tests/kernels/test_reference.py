"""The spec's own functions where no fast backend exists yet (stem), and package-level behaviour."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vqdna.kernels import reference


@pytest.mark.parametrize("width", [5, 3, 1])
def test_stem_equals_conv_over_one_hot(width, rng):
    """GELU(LayerNorm(Conv1d(one_hot(ids)))) without the one-hot tensor; the pad id adds nothing."""
    b, length, d = 3, 29, 12
    ids = torch.randint(0, 6, (b, length), generator=rng)  # 5 = pad
    weight = torch.randn(d, 5, width, generator=rng, dtype=torch.float64)
    bias, ln_w, ln_b = (torch.randn(d, generator=rng, dtype=torch.float64) for _ in range(3))
    got = reference.stem(ids, weight, bias, ln_w, ln_b)
    one_hot = F.one_hot(ids, 6)[..., :5].permute(0, 2, 1).double()  # pad -> all-zero column
    conv = F.conv1d(one_hot, weight, bias, padding=width // 2).permute(0, 2, 1)
    want = F.gelu(F.layer_norm(conv, (d,), ln_w, ln_b, 1e-6))
    assert torch.allclose(got, want, atol=1e-12)


def test_stem_rejects_bad_ids():
    ids = torch.tensor([[0, 1, 7, 2]])
    with pytest.raises(ValueError, match=r"ids\[0, 2\] = 7"):
        reference.stem(ids, torch.randn(4, 5, 5), torch.zeros(4), torch.ones(4), torch.zeros(4))


def test_pure_python_install_warns_once_and_works():
    """Without vqdna._C the package imports with one warning and runs the reference path."""
    code = (
        "import sys, warnings; sys.modules['vqdna._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, vqdna\n"
        "    msgs = [str(x.message) for x in w if 'vqdna._C' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'pip install --no-build-isolation' in msgs[0], msgs\n"
        "assert 'native' not in vqdna.kernels.available_backends('cpu')\n"
        "codes, dist = vqdna.kernels.lookup(torch.randn(5, 3), torch.randn(4, 3))\n"
        "assert vqdna.kernels.last_backend('lookup') == 'reference'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_lookup_largest_codebook(backend, rng):
    """K = 65536 (the largest uint16-addressable vocabulary)."""
    from tests.conftest import require_backend
    from vqdna.kernels import lookup

    require_backend(backend, "cpu")
    k, d = 65536, 8
    codebook = torch.randn(k, d, generator=rng)
    pick = torch.randint(k, (50,), generator=rng)
    z = codebook[pick] + 1e-4 * torch.randn(50, d, generator=rng)
    codes, dist = lookup(z, codebook, backend=backend)
    exact = torch.cdist(z.double(), codebook.double()).argmin(1)
    assert torch.equal(codes.long(), exact)


def test_laplace_smoothing_by_hand():
    """(n_k + eps) / (sum n + K eps) * sum n (docs/design.md §2.3): the total is kept, no code is 0.
    Every EMA path (ops, bench, modules) uses this one formula, so it is checked against numbers."""
    sizes = torch.tensor([0.0, 2.0], dtype=torch.float64)
    got = reference.laplace_smoothed(sizes, eps=1.0)
    assert torch.allclose(got, torch.tensor([0.5, 1.5], dtype=torch.float64))  # (0+1)/(2+2)*2, (2+1)/4*2
    assert float(got.sum()) == pytest.approx(float(sizes.sum()))


def test_ema_stats_by_hand():
    """reference.ema_stats: counts and sums per code, masked rows count for nothing, and with
    prev_codes the vector is 2 x - prev_codebook[prev_code]."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    codes = torch.tensor([1, 1, 0], dtype=torch.int32)
    counts, sums = reference.ema_stats(x, codes, 3, mask=torch.tensor([True, True, False]))
    assert counts.tolist() == [0.0, 2.0, 0.0] and sums.tolist() == [[0, 0], [4, 6], [0, 0]]
    prev = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    _, sums = reference.ema_stats(x, codes, 2, prev_codes=torch.zeros(3, dtype=torch.int32), prev_codebook=prev)
    assert sums.tolist() == [[9, 11], [6, 10]]  # 2x - 1: [1,3]+[5,7] for code 1, [9,11] for code 0
