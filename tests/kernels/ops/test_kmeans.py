"""kmeans on the fast kernels against the reference (docs/design.md §2.4)."""

import pytest
import torch

from tests.conftest import backend_params, require_backend
from vqdna.kernels import kmeans, reference


def blobs(n, d, k, gen):
    centers = torch.randn(k, d, generator=gen) * 5
    return centers[torch.randint(k, (n,), generator=gen)] + 0.2 * torch.randn(n, d, generator=gen), centers


@pytest.mark.parametrize("backend,device", backend_params("kmeans"))
def test_kmeans_finds_separated_clusters(backend, device, rng):
    require_backend(backend, device, "ema_stats")
    require_backend(backend, device, "lookup")
    # Fixed data: k-means++ misses a cluster with a small probability on any data, and that is a
    # property of the algorithm, not of a backend (backends are compared in the next test).
    x, centers = blobs(600, 8, 6, torch.Generator().manual_seed(0))
    got = kmeans(x.to(device), 6, iters=10, seed=3, backend=backend).cpu()
    # every true center has a centroid next to it
    nearest = torch.cdist(centers, got).min(1).values
    assert bool((nearest < 0.3).all()), nearest


@pytest.mark.parametrize("backend,device", backend_params("kmeans"))
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_fast_equals_reference(backend, device, init, rng):
    require_backend(backend, device, "ema_stats")
    require_backend(backend, device, "lookup")
    x, _ = blobs(400, 5, 4, rng)
    a = kmeans(x.to(device), 4, iters=5, init=init, seed=1, backend=backend).cpu()
    b = kmeans(x.to(device), 4, iters=5, init=init, seed=1, backend=backend).cpu()
    assert torch.equal(a, b)  # deterministic for a seed
    ref = reference.kmeans(x, 4, iters=5, init=init, seed=1)  # same initialisation, same rounds
    assert torch.allclose(a, ref, atol=1e-4)


def test_kmeans_empty_cluster_keeps_centroid_and_k_above_n(rng):
    x = torch.randn(3, 4, generator=rng)
    c = kmeans(x, 5, iters=3, init="random", seed=0)
    assert c.shape == (5, 4) and bool(torch.isfinite(c).all())
    with pytest.raises(ValueError, match="N >= 1"):
        kmeans(torch.randn(0, 4), 3)
    with pytest.raises(ValueError, match="unknown init"):
        kmeans(x, 2, init="bogus")


@pytest.mark.parametrize("backend,device", backend_params("kmeans"))
def test_kmeans_empty_clusters_stay_where_they_were(backend, device):
    """k = 6 over 4 distinct points (50 copies each): k-means++ takes the 4 points, then (every
    weight 0) copies of the last row, which the lower index wins on every tie, so clusters 4 and 5
    stay empty for every round and keep their initial centroid. Dyadic coordinates: every mean is
    exact, so nothing moves and the result equals the reference bit for bit."""
    require_backend(backend, device, "ema_stats")
    require_backend(backend, device, "lookup")
    points = torch.tensor([[8.0, 1.5, -2.25], [-6.5, 4.0, 3.0], [5.0, -7.75, 6.5], [-3.0, -4.5, -9.0]])
    x = points.repeat(50, 1)
    init = reference.kmeans_init(x, 6, seed=0)
    assert torch.equal(init[4], points[3]) and torch.equal(init[5], points[3])
    want = reference.kmeans(x, 6, iters=3, seed=0)
    assert torch.equal(want, init)  # the spec keeps empty clusters (and exact means) in place
    got = kmeans(x.to(device), 6, iters=3, seed=0, backend=backend).cpu()
    assert torch.equal(got, want)
