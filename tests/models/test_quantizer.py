"""VectorQuantizer and HRQuantizer: values, gradients, EMA, restarts, compile, distributed."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqdna import HRQuantizer, VectorQuantizer
from vqdna.kernels import dispatch, reference


def test_vq_forward_values_and_straight_through(rng):
    vq = VectorQuantizer(dim=6, codebook_size=10, commitment_weight=0.5)
    x = torch.randn(3, 7, 6, generator=rng, requires_grad=True)
    vq.eval()
    q, codes, loss = vq(x)
    ref_codes, _ = reference.lookup(x.detach().reshape(-1, 6), vq.codebook)
    assert codes.shape == (3, 7) and codes.dtype == torch.int64
    assert torch.equal(codes.reshape(-1), ref_codes.long())
    assert torch.allclose(q, vq.codebook[codes])
    assert torch.allclose(loss, 0.5 * (x - vq.codebook[codes]).pow(2).mean())
    (g,) = torch.autograd.grad(q.sum(), x)
    assert torch.equal(g, torch.ones_like(x))  # straight-through
    (g,) = torch.autograd.grad(loss, x)
    assert torch.allclose(g, 0.5 * 2 * (x - vq.codebook[codes]) / x.numel())


def test_vq_ema_only_in_training_from_the_codebook_used(rng):
    vq = VectorQuantizer(dim=4, codebook_size=5, decay=0.8, eps=1e-5)
    x = torch.randn(50, 4, generator=rng)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(x)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    vq.train()
    q, codes, _ = vq(x)
    assert torch.allclose(q, before["codebook"][codes])  # quantized with the old codebook
    cs, es, cb = reference.ema_update(x, codes, before["cluster_size"], before["embed_sum"], decay=0.8, eps=1e-5)
    assert torch.allclose(vq.cluster_size, cs) and torch.allclose(vq.embed_sum, es, atol=1e-6)
    assert torch.allclose(vq.codebook, cb, atol=1e-6)
    assert vq.cluster_size.dtype == torch.float32 and vq.embed_sum.dtype == torch.float32


def test_vq_mask_excludes_padding(rng):
    vq = VectorQuantizer(dim=4, codebook_size=5)
    x = torch.randn(2, 10, 4, generator=rng)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    x_pad = x.clone()
    x_pad[1, 6:] = 1e3  # garbage in padding must not move the codebook
    a = VectorQuantizer(dim=4, codebook_size=5)
    a.load_state_dict(vq.state_dict())
    vq(x_pad, mask=mask)
    a(x[mask][None])
    assert torch.allclose(vq.codebook, a.codebook, atol=1e-5)


def test_vq_bf16_input(rng):
    vq = VectorQuantizer(dim=8, codebook_size=16)
    x = torch.randn(40, 8, generator=rng).bfloat16()
    q, codes, loss = vq(x)
    assert q.dtype == torch.bfloat16 and vq.codebook.dtype == torch.float32 and torch.isfinite(loss)


def test_nonfinite_input_names_the_row(rng):
    vq = VectorQuantizer(dim=4, codebook_size=5)
    x = torch.randn(2, 6, 4, generator=rng)
    x[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"row \(1, 2\) holds NaN or Inf"):
        vq(x)
    VectorQuantizer(dim=4, codebook_size=5, check_finite=False)(x)  # the switch
    h = HRQuantizer(dim=4, codebook_sizes=(3, 5))
    zs = [torch.randn(2, 6, 4, generator=rng) for _ in range(2)]
    zs[1][0, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"zs\[1\]: row \(0, 4\)"):
        h(zs)


def test_dead_codes_restart_from_batch_rows(rng):
    vq = VectorQuantizer(dim=3, codebook_size=8, decay=0.5, threshold_ema_dead_code=0.3)
    with torch.no_grad():
        vq.codebook[4:] = 100.0  # far away: never chosen, and their EMA size is already 0
        vq.embed_sum[4:] = 0.0
        vq.cluster_size[4:] = 0.0
    x = torch.randn(64, 3, generator=rng)
    vq(x)
    restarted = vq.codebook[4:]
    assert bool((restarted.abs() < 50).all())
    # each restarted code is a row of the batch, with its EMA state reset to match
    assert bool((restarted[:, None, :] == x[None]).all(-1).any(-1).all())
    assert torch.allclose(vq.cluster_size[4:], torch.full((4,), 0.3))
    assert torch.allclose(vq.embed_sum[4:], restarted * 0.3)


def test_kmeans_init_and_reinit_and_usage(rng):
    centers = torch.randn(4, 5, generator=rng) * 4
    x = centers[torch.randint(4, (400,), generator=rng)] + 0.1 * torch.randn(400, 5, generator=rng)
    vq = VectorQuantizer(dim=5, codebook_size=4, kmeans_init=True, kmeans_iters=10)
    vq(x)
    assert bool(vq.initted)
    assert bool((torch.cdist(centers, vq.codebook).min(1).values < 0.3).all())
    u = vq.usage()
    assert u["used_fraction"] == 1.0 and 3.0 < u["perplexity"] <= 4.0
    vq.reinit_kmeans(x + 1.0)
    assert bool((torch.cdist(centers + 1.0, vq.codebook).min(1).values < 0.3).all())


def test_hrq_module_values_gradients_and_loss(rng):
    h = HRQuantizer(dim=6, codebook_sizes=(4, 9), commitment_weight=0.9)
    h.eval()
    zs = [torch.randn(5, 6, generator=rng, requires_grad=True) for _ in range(2)]
    zhat, codes, loss = h(zs)
    ref_codes, ref_levels = reference.hrq_quantize([z.detach() for z in zs], h.codebooks)
    assert torch.equal(codes, ref_codes.long()) and torch.allclose(zhat, ref_levels[-1])
    want = 0.9 * sum((z - lv).pow(2).mean() for z, lv in zip(zs, ref_levels))
    assert torch.allclose(loss, want)
    g0, g1 = torch.autograd.grad(zhat.sum(), zs)
    assert torch.allclose(g0, torch.full_like(g0, 0.5)) and torch.allclose(g1, torch.full_like(g1, 1.0))


def test_hrq_ema_per_level_on_residuals(rng):
    h = HRQuantizer(dim=4, codebook_sizes=(3, 6), decay=0.7)
    zs = [torch.randn(80, 4, generator=rng) for _ in range(2)]
    before = [(lv.cluster_size.clone(), lv.embed_sum.clone(), lv.codebook.clone()) for lv in h.levels]
    _, codes, _ = h(zs)
    h1 = 2 * zs[1] - before[0][2][codes[0]]
    for level, x in enumerate([zs[0], h1]):
        cs, es, cb = reference.ema_update(x, codes[level], before[level][0], before[level][1], decay=0.7, eps=1e-5)
        assert torch.allclose(h.levels[level].codebook, cb, atol=1e-5)
    assert [u["used_fraction"] > 0 for u in h.usage()] == [True, True]


@pytest.mark.parametrize("module", ["vq", "hrq"])
@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(module, training, rng, monkeypatch):
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    torch._dynamo.reset()
    if module == "vq":
        m = VectorQuantizer(dim=8, codebook_size=16)
        args = (torch.randn(4, 10, 8, generator=rng),)
    else:
        m = HRQuantizer(dim=8, codebook_sizes=(4, 16))
        args = ([torch.randn(4, 10, 8, generator=rng) for _ in range(2)],)
    m.train(training)
    eager = type(m)(8, 16) if module == "vq" else HRQuantizer(8, (4, 16))
    eager.load_state_dict(m.state_dict())
    eager.train(training)
    compiled = torch.compile(m, fullgraph=True)
    out_c = compiled(*args)
    out_e = eager(*args)
    for a, b in zip(out_c, out_e):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    for (k, a), b in zip(m.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k


def test_modules_use_the_fast_backend_on_cpu(monkeypatch, rng):
    monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    from tests.conftest import require_backend

    require_backend("native", "cpu", "lookup")
    VectorQuantizer(dim=8, codebook_size=16)(torch.randn(10, 8, generator=rng))
    assert dispatch.last_backend("lookup") == "native"


# ------------------------------------------------------------------------------------------
# Distributed: two CPU processes (gloo) with half a batch each == one process with all of it.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, kind, x, zs, state, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1234 + rank)  # different per rank: restarts must still agree
        if kind == "vq-kmeans":
            # threshold 5: codes with fewer than ~5 of the 64 rows a step die and restart
            m = VectorQuantizer(4, 8, decay=0.6, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=5.0)
        elif kind == "vq":
            m = VectorQuantizer(4, 8, decay=0.6, threshold_ema_dead_code=0.2)
        else:
            m = HRQuantizer(4, (3, 8), decay=0.6, threshold_ema_dead_code=0.2)
        m.load_state_dict(state)
        half = x.shape[0] // world
        for _ in range(3):
            if kind.startswith("vq"):
                m(x[rank * half : (rank + 1) * half])
            else:
                m([z[rank * half : (rank + 1) * half] for z in zs])
        torch.save({k: v.clone() for k, v in m.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["vq", "hrq"])
def test_two_ranks_equal_one_process(kind, tmp_path, rng):
    x = torch.randn(64, 4, generator=rng)
    zs = [torch.randn(64, 4, generator=rng) for _ in range(2)]
    single = VectorQuantizer(4, 8, decay=0.6) if kind == "vq" else HRQuantizer(4, (3, 8), decay=0.6)
    with torch.no_grad():  # a few codes far away so that they die and restart
        for cb in ([single.codebook] if kind == "vq" else single.codebooks):
            cb[-2:] = 50.0
        for es in ([single.embed_sum] if kind == "vq" else [lv.embed_sum for lv in single.levels]):
            es[-2:] = 50.0
    state = {k: v.clone() for k, v in single.state_dict().items()}
    mp.spawn(_worker, args=(2, _free_port(), kind, x, zs, state, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        if not k.endswith("recent_counts"):  # usage monitoring is per rank by design
            assert torch.equal(r0[k], r1[k]), f"ranks drifted apart on {k}"
    # Without restarts the two-rank run equals one process on the whole batch.
    nodead = VectorQuantizer(4, 8, decay=0.6) if kind == "vq" else HRQuantizer(4, (3, 8), decay=0.6)
    nodead.load_state_dict(state)
    for _ in range(3):
        nodead(x) if kind == "vq" else nodead(zs)
    codebook_keys = [k for k in r0 if k.endswith("codebook")]
    for k in codebook_keys:
        live = r0[k].abs().amax(-1) < 40  # codes that never died
        assert torch.allclose(r0[k][live], nodead.state_dict()[k][live], atol=1e-5), k


def test_two_ranks_share_kmeans_init_and_restarts(tmp_path, rng):
    """k-means initialisation and dead-code restarts on each rank's own half of the batch, rank 0's
    result broadcast: the ranks start and stay identical. (The test above runs without restarts:
    its far codes do not fall below the threshold within its three steps.)"""
    x = torch.randn(64, 4, generator=rng)
    state = {k: v.clone() for k, v in VectorQuantizer(4, 8).state_dict().items()}
    mp.spawn(_worker, args=(2, _free_port(), "vq-kmeans", x, None, state, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert bool(r0["initted"]) and not torch.equal(r0["codebook"], state["codebook"])
    assert bool((r0["cluster_size"] == 5.0).any())  # a code restarted at the last step
    for k in ("codebook", "cluster_size", "embed_sum"):
        assert torch.equal(r0[k], r1[k]), f"ranks drifted apart on {k}"


def test_vq_masked_loss_and_gradient(rng):
    vq = VectorQuantizer(dim=4, codebook_size=6, commitment_weight=1.0)
    vq.eval()
    x = torch.randn(3, 5, 4, generator=rng, requires_grad=True)
    mask = torch.rand(3, 5, generator=rng) < 0.6
    _, codes, loss = vq(x, mask=mask)
    q = vq.codebook[codes]
    want = ((x - q).pow(2) * mask[..., None]).sum() / (mask.sum() * 4)
    assert torch.allclose(loss, want, atol=1e-6)
    (g,) = torch.autograd.grad(loss, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert torch.allclose(g, g_want, atol=1e-7)
    assert bool((g[~mask] == 0).all())
