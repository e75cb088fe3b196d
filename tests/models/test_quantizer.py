"""VectorQuantizer and HRQuantizer: values, gradients, EMA, restarts, compile, distributed."""

import copy
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
    # the paths that do not use the fused quantize op (channel-first input, per-head codebooks) pass it too
    per_head = VectorQuantizer(dim=6, codebook_size=10, heads=2, codebook_dim=3, separate_codebook_per_head=True)
    for other, shape in ((VectorQuantizer(dim=6, codebook_size=10, channel_last=False), (3, 6, 7)), (per_head, (3, 7, 6))):
        x = torch.randn(*shape, generator=rng, requires_grad=True)
        (g,) = torch.autograd.grad(other.eval()(x)[0].sum(), x)
        assert torch.equal(g, torch.ones_like(x))


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
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (rank 0 aborted once)
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


# ------------------------------------------------------------------------------------------
# No host syncs in a steady-state step: every constructor option, eager (a dispatch mode that
# fails on any read of a tensor's value), torch.compile(fullgraph=True), and on a GPU the CUDA
# sync debug mode and a CUDA-graph capture.

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class _NoHostReads(TorchDispatchMode):
    """Fails on every op that reads a tensor's value into Python or has a data-dependent output
    shape (what drains a GPU's queue): .item(), bool(), .tolist(), .nonzero(), x[bool_mask]."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func in _HOST_READS or boolean_index:
            raise AssertionError(f"host sync in a steady-state step: {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hrq_module_fused_losses_equal_the_reference_path(masked, training, rng):
    """HRQuantizer's loss and check come from hrq_quantize's fused outputs: codes, zhat, the loss and
    the gradients of zhat and loss together equal the reference computed the long way (the formula
    the module used before: sum_l masked mean((Z_l - sg(zhat_l))^2))."""
    h = HRQuantizer(dim=6, codebook_sizes=(4, 9), commitment_weight=0.9, decay=0.8).train(training)
    zs = [torch.randn(3, 7, 6, generator=rng, requires_grad=True) for _ in range(2)]
    mask = torch.rand(3, 7, generator=rng) < 0.6 if masked else None
    books = [c.clone() for c in h.codebooks]  # before the EMA step of a training forward
    zhat, codes, loss = h(zs, mask=mask)
    w = torch.randn(zhat.shape, generator=rng)
    grads = torch.autograd.grad((zhat * w).sum() + 3.0 * loss, zs)
    ref_zs = [z.detach().clone().requires_grad_() for z in zs]
    ref_codes, ref_levels = reference.hrq_quantize([z.reshape(-1, 6) for z in ref_zs], books)
    want = 0.0
    for z, lv in zip(ref_zs, ref_levels):
        diff = (z - lv.detach().view(3, 7, 6)).pow(2)
        m = torch.ones(3, 7) if mask is None else mask.float()
        want = want + (diff * m[..., None]).sum() / (m.sum() * 6).clamp_min(1)
    want = 0.9 * want
    ref_zhat = ref_levels[-1].view(3, 7, 6)
    ref_grads = torch.autograd.grad((ref_zhat * w).sum() + 3.0 * want, ref_zs)
    assert torch.equal(codes, ref_codes.long().view(2, 3, 7)) and torch.allclose(zhat, ref_zhat)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_hrq_module_needs_no_isfinite_pass(rng, monkeypatch):
    """The finite check reads the op's per-level report: no torch.isfinite pass over the inputs (native op)."""
    h = HRQuantizer(dim=6, codebook_sizes=(4, 9), check_finite=True).eval()
    zs = [torch.randn(40, 6, generator=rng) for _ in range(2)]

    def no_isfinite(*args, **kwargs):
        raise AssertionError("torch.isfinite called")

    monkeypatch.setattr(torch, "isfinite", no_isfinite)
    h(zs)
    assert dispatch.last_backend("hrq_quantize") == "native"


# (kmeans_init, threshold_ema_dead_code, mask, check_finite): every option on and off. check_finite
# True reads the device on the CPU by design (the named-row ValueError); off the CPU it is the
# assertion, which "assert" exercises here.
_OPTIONS = [(km, dead, mask, cf) for km in (False, True) for dead in (0.0, 1.0) for mask in (False, True)
            for cf in ("assert", False)]


def _make(kind, **kw):
    return VectorQuantizer(8, 16, **kw) if kind == "vq" else HRQuantizer(8, (4, 16), **kw)


def _inputs(kind, dtype, mask, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 10, 8, generator=g).to(device, dtype) for _ in range(1 if kind == "vq" else 2)]
    m = (torch.rand(4, 10, generator=g) < 0.7).to(device) if mask else None
    return (xs[0] if kind == "vq" else xs), m


@pytest.mark.parametrize("kind", ["vq", "hrq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("km, dead, mask, cf", _OPTIONS)
def test_steady_state_step_reads_nothing_back(kind, dtype, km, dead, mask, cf):
    m = _make(kind, kmeans_init=km, threshold_ema_dead_code=dead, check_finite=cf)
    x, msk = _inputs(kind, dtype, mask, seed=0)
    m.train()
    m(x, mask=msk)  # the first step: k-means init may read back once
    with _NoHostReads():
        for seed in (1, 2):
            m(*_inputs(kind, dtype, mask, seed))
        m.eval()
        m(x, mask=msk)


def test_kmeans_init_flag_follows_the_buffer(rng):
    """The Python mirror of `initted`: a loaded, initialised state is not re-initialised (and the
    step reads nothing back), a written buffer is re-read, and train() re-reads a buffer that was
    replaced behind the module's back (as a loader that assigns tensors would)."""
    x = torch.randn(200, 5, generator=rng)
    done = VectorQuantizer(5, 4, kmeans_init=True)
    done(x)

    def ema_step_only(module):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with _NoHostReads():
            _, codes, _ = module(x)
        _, _, want = reference.ema_update(x, codes, state["cluster_size"], state["embed_sum"], decay=0.5, eps=1e-5)
        assert torch.allclose(module.codebook, want, atol=1e-6)  # an EMA step, not a new k-means

    fresh = VectorQuantizer(5, 4, kmeans_init=True, decay=0.5, check_finite=False)
    fresh.load_state_dict(done.state_dict())
    ema_step_only(fresh)
    fresh.initted.fill_(False)  # asks for a re-initialisation
    fresh(x + 3.0)
    assert bool(fresh.initted) and fresh.codebook.mean() > 2.0
    other = VectorQuantizer(5, 4, kmeans_init=True, decay=0.5, check_finite=False)
    for name, value in done.state_dict().items():
        other._buffers[name] = value.clone()
    other.train()
    ema_step_only(other)


def test_restarts_leave_the_global_rng_alone_and_pick_unmasked_rows(rng):
    vq = VectorQuantizer(dim=3, codebook_size=8, decay=0.5, threshold_ema_dead_code=0.3)
    with torch.no_grad():
        vq.codebook[4:] = 100.0
        vq.embed_sum[4:] = 0.0
        vq.cluster_size[4:] = 0.0
    x = torch.randn(4, 16, 3, generator=rng)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[2, 3:7] = True
    state = torch.get_rng_state()
    vq(x, mask=mask)
    assert torch.equal(torch.get_rng_state(), state)
    restarted = vq.codebook[4:]
    assert bool((restarted[:, None, :] == x[mask][None]).all(-1).any(-1).all())
    assert torch.unique(restarted, dim=0).shape[0] == 4  # distinct rows: 4 dead codes, 4 usable rows
    # nothing to pick from: no restart (a restart would set the cluster size to the threshold)
    dead = VectorQuantizer(dim=3, codebook_size=8, threshold_ema_dead_code=0.3)
    with torch.no_grad():
        dead.cluster_size.fill_(0.1)
    dead(x, mask=torch.zeros(4, 16, dtype=torch.bool))
    assert torch.allclose(dead.cluster_size, torch.full((8,), 0.099))


def test_check_finite_modes(rng):
    x = torch.randn(3, 4, generator=rng)
    x[2, 1] = float("nan")
    for mode in (True, "raise"):
        with pytest.raises(ValueError, match=r"VectorQuantizer input x: row 2 holds NaN or Inf"):
            VectorQuantizer(4, 5, check_finite=mode)(x)
    with pytest.raises(RuntimeError, match=r"zs\[0\] holds NaN or Inf"):
        HRQuantizer(4, (3, 5), check_finite="assert")([x, x.clone()])
    with pytest.raises(ValueError, match="check_finite must be"):
        VectorQuantizer(4, 5, check_finite="always")


def _compiled_equals_eager(kind, dtype, km, dead, mask, cf, fresh):
    """torch.compile(fullgraph=True) of a module against the same module run eagerly, in train and
    eval, over several steps: the same codes, outputs and state, and no recompilation once warm."""
    torch._dynamo.reset()
    torch.manual_seed(0)  # the initial codebook: the same case whatever ran before
    m = _make(kind, kmeans_init=km, threshold_ema_dead_code=dead, check_finite=cf).train()
    if not fresh:
        m(*_inputs(kind, dtype, mask, seed=0))
    eager = copy.deepcopy(m)  # the same state and Python-side flags
    compiled = torch.compile(m, fullgraph=True)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for training in (True, False):
        m.train(training)
        eager.train(training)
        for step in range(3):
            if step == 2:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            args = _inputs(kind, dtype, mask, seed=10 * training + step + 1)
            half = dtype in (torch.bfloat16, torch.float16)
            if half:  # start each step from the same state (still compared below)
                _assert_states_close(m, eager)
                eager.load_state_dict(m.state_dict())
            out_c, out_e = compiled(*args), eager(*args)
            same = out_c[1] == out_e[1]
            if kind == "hrq":
                same = same.all(0)
            # Inductor sums ||e_k||^2 in another order than eager: in half precision a near-tie
            # may flip (a few rows of 40); in float32 the codes are equal.
            assert bool(same.all()) if not half else int((~same).sum()) <= 2, (~same).sum()
            torch.testing.assert_close(out_c[0][same].float(), out_e[0][same].float(), atol=atol, rtol=1e-3)
            torch.testing.assert_close(out_c[2].float(), out_e[2].float(), atol=atol, rtol=1e-3)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "recompiled in a steady state"
    _assert_states_close(m, eager)


def _assert_states_close(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("kind", ["vq", "hrq"])
def test_compile_fullgraph_every_option_on(kind):
    """The representative case: k-means init done, restarts, a mask, the NaN check on."""
    _compiled_equals_eager(kind, torch.float32, True, 1.0, True, True, fresh=False)


def test_compile_fullgraph_fresh_kmeans_init():
    """From a fresh module: the one-time k-means init is traced too (without a mask: x[mask] has a
    data-dependent shape), then the graph without it is compiled once."""
    _compiled_equals_eager("vq", torch.float32, True, 1.0, False, True, fresh=True)


# float32 over every combination of the options (check_finite True, "raise" and "assert" are the
# same device-side assertion under compile), the other dtypes and modes with every option on.
_COMPILE_MATRIX = [(torch.float32, km, dead, mask, cf) for km in (False, True) for dead in (0.0, 1.0)
                   for mask in (False, True) for cf in (True, False)]
_COMPILE_MATRIX += [(dtype, True, 1.0, True, True) for dtype in (torch.bfloat16, torch.float16, torch.float64)]
_COMPILE_MATRIX += [(torch.float32, True, 1.0, True, cf) for cf in ("raise", "assert")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vq", "hrq"])
@pytest.mark.parametrize("dtype, km, dead, mask, cf", _COMPILE_MATRIX, ids=str)
def test_compile_fullgraph_matrix(kind, dtype, km, dead, mask, cf):
    """Fresh where that can work (k-means init without a mask), else after the first step."""
    _compiled_equals_eager(kind, dtype, km, dead, mask, cf, fresh=km and not mask)


def test_compile_fullgraph_sync_codebook():
    """sync_codebook=True in a one-rank process group: the collectives trace (functional ones)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        m = HRQuantizer(8, (4, 16), kmeans_init=True, threshold_ema_dead_code=1.0, sync_codebook=True).train()
        x, msk = _inputs("hrq", torch.float32, True, seed=0)
        m(x, mask=msk)
        eager = copy.deepcopy(m)
        compiled = torch.compile(m, fullgraph=True)
        for seed in (1, 2):
            args = _inputs("hrq", torch.float32, True, seed)
            assert torch.equal(compiled(*args)[1], eager(*args)[1])
        for (k, a), b in zip(m.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["vq", "hrq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("km, dead, mask, cf", [(km, dead, mask, cf) for km in (False, True) for dead in (0.0, 1.0)
                                                for mask in (False, True) for cf in (True, "assert", False)])
def test_cuda_steady_state_step_does_not_sync(kind, dtype, km, dead, mask, cf):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m = _make(kind, kmeans_init=km, threshold_ema_dead_code=dead, check_finite=cf).cuda().train()
    x, msk = _inputs(kind, dtype, mask, seed=0, device="cuda")
    m(x, mask=msk)  # k-means init (one sync, once) and the first-call work
    steps = [_inputs(kind, dtype, mask, seed, device="cuda") for seed in (1, 2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for args in steps:
            _, _, loss = m(*args)
        m.eval()
        m(x, mask=msk)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["vq", "hrq"])
def test_cuda_graph_training_step_equals_eager(kind):
    """Capture one training step (forward with the EMA update and restarts, backward to the
    input) in a CUDA graph; its replays equal the same steps run eagerly."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kw = dict(kmeans_init=True, threshold_ema_dead_code=1.0)
    m = _make(kind, **kw).cuda().train()
    x, msk = _inputs(kind, torch.float32, True, seed=0, device="cuda")
    static = [t.clone().requires_grad_() for t in ([x] if kind == "vq" else x)]

    def step():
        out, codes, loss = m(static[0] if kind == "vq" else static, mask=msk)
        grads = torch.autograd.grad(loss + out.float().square().sum(), static)
        return out, codes, loss, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (k-means init) outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(m)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (1, 2):
        new, _ = _inputs(kind, torch.float32, True, seed, device="cuda")
        for s, t in zip(static, [new] if kind == "vq" else new):
            s.detach().copy_(t)
        graph.replay()
        ins = [t.clone().requires_grad_() for t in ([new] if kind == "vq" else new)]
        out, codes, loss = eager(ins[0] if kind == "vq" else ins, mask=msk)
        grads = torch.autograd.grad(loss + out.float().square().sum(), ins)
        assert torch.equal(captured[1], codes)
        torch.testing.assert_close(captured[0], out)
        torch.testing.assert_close(captured[2], loss)
        for a, b in zip(captured[3], grads):
            torch.testing.assert_close(a, b)
    for (k, a), b in zip(m.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def test_vq_runs_the_fused_quantize_op_and_follows_codebook_changes(rng):
    """One codebook: the forward is the quantize op (codes, rows, loss sum, non-finite report in one
    pass); its cached ||e_k||^2 follows in-place codebook writes (load_state_dict, copy_, EMA)."""

    vq = VectorQuantizer(dim=5, codebook_size=8).eval()
    x = torch.randn(30, 5, generator=rng)
    q, codes, loss = vq(x)
    assert dispatch.last_backend("quantize") is not None
    assert torch.equal(codes, reference.lookup(x, vq.codebook)[0].long())
    with torch.no_grad():
        vq.codebook.mul_(-3.0)  # same tensor, new version: the cache must not serve the old norms
    q, codes, loss = vq(x)
    assert torch.equal(codes, reference.lookup(x, vq.codebook)[0].long())
    assert torch.equal(q, vq.codebook[codes])
    torch.testing.assert_close(loss, 0.5 * (x - q).pow(2).mean())
    vq.load_state_dict({**vq.state_dict(), "codebook": torch.randn(8, 5, generator=rng)})
    q, codes, _ = vq(x)
    assert torch.equal(codes, reference.lookup(x, vq.codebook)[0].long())
    x[4, 2] = float("nan")
    with pytest.raises(ValueError, match="row 4 holds NaN or Inf"):
        vq(x)


@pytest.mark.parametrize("shape", [(1, 24, 300), (2, 24, 5, 30)], ids=["channel_last=False", "accept_image_fmap"])
def test_vq_channel_first_eval_reads_x_in_place(shape, rng):
    """Channel-first x [B, dim, ...] on the CPU: the eval forward finds the codes without a
    transposing copy of x (the lookup's native kernel reads its columns) and returns what the
    channel-last module returns for the moved input."""
    from torch.profiler import ProfilerActivity, profile

    image = len(shape) == 4
    vq = VectorQuantizer(24, 37, channel_last=image, accept_image_fmap=image).eval()
    last = VectorQuantizer(24, 37).eval()
    last.load_state_dict(vq.state_dict())
    x = torch.randn(shape, generator=rng)
    with torch.no_grad():
        out, codes, loss = vq(x)
        want_out, want_codes, want_loss = last(x.movedim(1, -1).contiguous())
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            vq(x)
    assert torch.equal(codes, want_codes) and torch.equal(out, want_out.movedim(-1, 1))
    torch.testing.assert_close(loss, want_loss)
    n = x.numel() // 24
    sizes = {(n, 24), tuple(x.shape), tuple(x.movedim(1, -1).shape), (n // shape[0], 24)}
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone") and any(tuple(s) in sizes for s in e.input_shapes)]
    assert not copies, f"x was copied: {copies}"


@pytest.mark.parametrize("mask", [False, True])
def test_cosine_eval_normalises_inside_the_quantize_op(monkeypatch, mask):
    """use_cosine_sim in eval: z goes to the fused op unnormalised (quantize(..., normalize=True), no
    separate pass over z), and the outputs, codes, loss and input gradient are those of normalising
    first: the nearest unit code of l2norm(z), straight-through, commitment loss of the unit rows."""
    import vqdna.models.quantizer as quantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(16, 32, use_cosine_sim=True, commitment_weight=0.7).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 16, generator=gen) * torch.rand(3, 50, 1, generator=gen) * 5
    g = torch.randn(3, 50, 16, generator=gen)
    m = torch.rand(3, 50, generator=gen) < 0.7 if mask else None
    xx = x.clone().requires_grad_(True)
    u = reference.l2norm(xx)
    codes_want, _ = reference.lookup(u.detach().reshape(-1, 16), vq.codebook)
    q = vq.codebook[codes_want.long()].reshape(u.shape)
    per_row = (u - q).pow(2).mean(-1)
    loss_want = 0.7 * (per_row.mean() if m is None else (per_row * m).sum() / m.sum())
    ((u + (q - u).detach()) * g).sum().add(loss_want).backward()

    normalised = []
    real = quantizer._l2norm
    monkeypatch.setattr(quantizer, "_l2norm", lambda t: normalised.append(tuple(t.shape)) or real(t))
    x.requires_grad_(True)
    out, codes, loss = vq(x, mask=m)
    assert tuple(x.shape) not in normalised, "eval normalised z in a pass of its own"
    ((out * g).sum() + loss).backward()
    if "native" in dispatch.available_backends("cpu", "quantize"):
        assert dispatch.last_backend("quantize") == "native"
    assert torch.equal(codes.reshape(-1), codes_want.long())
    torch.testing.assert_close(out, q)
    torch.testing.assert_close(loss, loss_want)
    torch.testing.assert_close(x.grad, xx.grad)
    # The rotation trick (the peer's default) changes only the gradient: without one, no pass either.
    vq.rotation_trick = True
    normalised.clear()
    with torch.no_grad():
        out_rot, codes_rot, _ = vq(x, mask=m)
    assert tuple(x.shape) not in normalised and torch.equal(codes_rot, codes) and torch.equal(out_rot, out.detach())


def test_separate_codebooks_one_lookup_and_one_ema_update_per_step(monkeypatch):
    """Per-head codebooks (issue 23): one batched lookup and one ema_update per training step for all
    heads (not one per head), with each head's code the nearest in its own codebook."""
    from vqdna import kernels

    calls = {"lookup": 0, "ema_update": 0}
    for name in calls:
        def counted(*args, _fn=getattr(kernels, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    vq = VectorQuantizer(8, 16, heads=4, codebook_dim=2, separate_codebook_per_head=True).train()
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0))
    books = vq.codebook.detach().clone().view(4, 16, 2)
    _, codes, _ = vq(x)
    assert calls == {"lookup": 1, "ema_update": 1}
    assert codes.shape == (3, 10, 4)
    z = x.view(3, 10, 4, 2)
    for h in range(4):
        want, _ = reference.lookup(z[..., h, :].reshape(-1, 2), books[h])
        assert torch.equal(codes[..., h].reshape(-1), want.long()), f"head {h}"


@pytest.mark.parametrize("cosine", [False, True], ids=["dist", "cosine"])
def test_separate_codebooks_sample_in_one_call(monkeypatch, cosine):
    """Per-head codebooks with stochastic_sample_codes (issue 23): one sample_codes call per training
    step for all heads (not one per head), drawing what per-head calls in order of the head draw (the
    peer's [C, rows, K] order)."""
    from vqdna import kernels

    calls = []
    real = kernels.sample_codes
    monkeypatch.setattr(kernels, "sample_codes", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    vq = VectorQuantizer(8, 16, heads=4, codebook_dim=2, separate_codebook_per_head=True, use_cosine_sim=cosine,
                         stochastic_sample_codes=True, sample_codebook_temp=0.5).train()
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0))
    books = vq.codebook.detach().clone().view(4, 16, 2)
    torch.manual_seed(3)
    _, codes, _ = vq(x)
    assert calls == [(4, 16, 2)], f"sample_codes calls (codebook shapes): {calls}"
    assert codes.shape == (3, 10, 4)
    z = x.view(-1, 4, 2)
    if cosine:  # the unit rows and codes the module searches with
        z, books = reference.l2norm(z), reference.l2norm(books)
    torch.manual_seed(3)
    for h in range(4):
        want = reference.sample_codes(z[:, h], books[h], 0.5, cosine)[0]
        assert torch.equal(codes[..., h].reshape(-1), want), f"head {h}"
