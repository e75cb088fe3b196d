"""VectorQuantizer against vector-quantize-pytorch's VectorQuantize itself: the same weights (moved
over by from_vector_quantize), the same inputs, per option and in the combinations people use:
outputs, codes, losses, gradients and the EMA state after a training step (tests/tolerances.py)."""

import copy

import pytest
import torch

from tests.models.test_quantizer import _NoHostReads
from tests.tolerances import PEER_PARITY_TOL
from vqdna import VectorQuantizer, kernels

vqp = pytest.importorskip("vector_quantize_pytorch")

RTOL, ATOL = PEER_PARITY_TOL

# Options per case; each also runs with the peer's defaults for the rest (decay 0.8, commitment
# weight 1, rotation_trick on).
CASES = {
    "plain": dict(),
    "straight_through": dict(rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "heads": dict(heads=2, codebook_dim=4),
    "heads_no_codebook_dim": dict(heads=2),  # the peer projects dim -> heads * dim
    "separate_heads": dict(heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "cosine_heads": dict(use_cosine_sim=True, heads=2, codebook_dim=4),
    "codebook_dim": dict(codebook_dim=4),
    "codebook_dim_rotation": dict(codebook_dim=4, rotation_trick=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "no_ema": dict(ema_update=False),
    "frozen": dict(freeze_codebook=True),
    "orthogonal": dict(orthogonal_reg_weight=0.3),
    "orthogonal_active": dict(orthogonal_reg_weight=0.3, orthogonal_reg_active_codes_only=True),
    "orthogonal_separate": dict(orthogonal_reg_weight=0.3, heads=2, codebook_dim=4, separate_codebook_per_head=True),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "stochastic_cosine": dict(stochastic_sample_codes=True, use_cosine_sim=True),
    "stochastic_heads": dict(stochastic_sample_codes=True, heads=2, codebook_dim=4),
    "stochastic_separate_heads": dict(stochastic_sample_codes=True, heads=2, codebook_dim=3, separate_codebook_per_head=True),
}

DIM, K = 8, 16


def _pair(seed=0, **opts):
    torch.manual_seed(seed)
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=K, **opts)
    return peer, VectorQuantizer.from_vector_quantize(peer)


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _step(module, x, g, seed, mask=None, **kw):
    """One training forward + backward of (out * g).sum() + loss; returns (out, codes, loss, dx)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the stochastic options draw from the global RNG
    out, codes, loss = module(x, mask=mask, **kw)
    ((out * g).sum() + loss).backward()
    return out.detach(), codes, loss.detach(), x.grad


def _state(module):
    """(codebook, cluster_size, embed_sum) in our layout."""
    if isinstance(module, VectorQuantizer):
        return module.codebook.detach(), module.cluster_size, module.embed_sum
    b = module._codebook
    return b.embed.detach().reshape(-1, b.embed.shape[-1]), b.cluster_size.reshape(-1), b.embed_avg.reshape(-1, b.embed.shape[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_matches_the_peer(case):
    peer, ours = _pair(**CASES[case])
    peer.train(), ours.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(2):  # the second step runs on the EMA-updated state
        x = torch.randn(2, 12, DIM, generator=gen)
        g = torch.randn(2, 12, DIM, generator=gen)
        peer.zero_grad(), ours.zero_grad()
        po, pc, pl, pdx = _step(peer, x, g, seed=step)
        oo, oc, ol, odx = _step(ours, x, g, seed=step)
        assert torch.equal(oc, pc), f"{case} step {step}: codes differ at {(oc != pc).nonzero()[:5].tolist()}"
        _close(oo, po, f"{case} output")
        _close(ol, pl, f"{case} loss")
        _close(odx, pdx, f"{case} input gradient")
        pg, og = _grads(peer), _grads(ours)
        for name in ("project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias"):
            assert (name in pg) == (name in og), name
            if name in pg:
                _close(og[name], pg[name], f"{case} {name} gradient")
        assert ("_codebook.embed" in pg) == ("codebook" in og), f"{case}: codebook gradient on one side only"
        if "codebook" in og:
            _close(og["codebook"], pg["_codebook.embed"].reshape(og["codebook"].shape), f"{case} codebook gradient")
        for got, want, what in zip(_state(ours), _state(peer), ("codebook", "cluster_size", "embed_sum")):
            _close(got, want, f"{case} step {step} {what}")


def test_eval_outputs_and_codes_match_the_peer():
    peer, ours = _pair(use_cosine_sim=True, heads=2, codebook_dim=4)
    peer.eval(), ours.eval()
    x = torch.randn(3, 20, DIM, generator=torch.Generator().manual_seed(2))
    po, pc, _ = peer(x)
    oo, oc, ol = ours(x)
    assert torch.equal(oc, pc)
    _close(oo, po, "eval output")
    assert ol > 0  # differs on purpose: the peer returns 0 in eval, we the commitment loss


@pytest.mark.parametrize("zeros", [True, False])
def test_masked_rows_match_the_peer(zeros):
    peer, ours = _pair(return_zeros_for_masked_padding=zeros)
    peer.train(), ours.train()
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, 10, DIM, generator=gen), torch.randn(2, 10, DIM, generator=gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    po, pc, pl, pdx = _step(peer, x, g, 0, mask=mask)
    oo, oc, ol, odx = _step(ours, x, g, 0, mask=mask)
    assert torch.equal(oc, pc) and bool((oc[1, 6:] == -1).all())
    _close(oo, po, "masked output")
    _close(ol, pl, "masked loss")
    _close(odx, pdx, "masked input gradient")
    for got, want, what in zip(_state(ours), _state(peer), ("codebook", "cluster_size", "embed_sum")):
        _close(got, want, f"masked {what}")


@pytest.mark.parametrize("layout", [dict(channel_last=False), dict(accept_image_fmap=True), dict(accept_3d_fmap=True)])
def test_layouts_match_the_peer(layout):
    peer, ours = _pair(**layout)
    peer.train(), ours.train()
    shape = {"channel_last": (2, DIM, 9), "accept_image_fmap": (2, DIM, 3, 4), "accept_3d_fmap": (2, DIM, 2, 3, 2)}[next(iter(layout))]
    gen = torch.Generator().manual_seed(4)
    x, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    po, pc, pl, pdx = _step(peer, x, g, 0)
    oo, oc, ol, odx = _step(ours, x, g, 0)
    assert oc.shape == pc.shape and torch.equal(oc, pc)
    assert oo.shape == po.shape
    _close(oo, po, "layout output")
    _close(odx, pdx, "layout input gradient")


@pytest.mark.parametrize("ema_update", [True, False])
def test_dead_code_restarts_match_the_peer_but_the_rows_picked(ema_update):
    """Differs on purpose: the peer restarts dead codes from random batch rows (global RNG), we
    from rows picked by a hash of the batch's codes (no RNG, no host sync). Everything else equal:
    the live codes' state, and each dead code restarts at some batch row with cluster size the
    threshold, embed_sum = row * threshold (here 1)."""
    peer, ours = _pair(threshold_ema_dead_code=1.0, ema_update=ema_update)
    peer.train(), ours.train()
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(8))
    dead = _state(peer)[1] * 0.8 + 0.2 * torch.bincount(ours(x, freeze_codebook=True)[1].reshape(-1), minlength=K) < 1.0
    peer(x), ours(x)
    assert 0 < int(dead.sum()) < K
    rows = x.reshape(-1, DIM)
    for (got, want), what in zip(zip(_state(ours), _state(peer)), ("codebook", "cluster_size", "embed_sum")):
        _close(got[~dead], want[~dead], f"live {what}")
    for module in (ours, peer):
        book, size, total = _state(module)
        assert bool((size[dead] == 1.0).all())
        assert bool(((book[dead][:, None] - rows[None]).abs().amax(-1) < 1e-6).any(-1).all())
        _close(total[dead], book[dead], "restarted embed_sum")


def test_freeze_codebook_per_call_and_ema_state_untouched():
    peer, ours = _pair()
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(torch.randn(4, 5, DIM), freeze_codebook=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_vector_quantize_moves_a_trained_state_and_refuses_unsupported_options():
    torch.manual_seed(0)
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=K, heads=2, codebook_dim=3, separate_codebook_per_head=True)
    peer.train()
    for _ in range(3):
        peer(torch.randn(2, 10, DIM))
    ours = VectorQuantizer.from_vector_quantize(peer)
    assert ours.codebook.shape == (2 * K, 3) and ours.cluster_size.shape == (2 * K,)
    assert torch.equal(ours.codebook, peer._codebook.embed.reshape(2 * K, 3))
    assert torch.equal(ours.embed_sum, peer._codebook.embed_avg.reshape(2 * K, 3))
    assert torch.equal(ours.cluster_size, peer._codebook.cluster_size.reshape(2 * K))
    assert torch.equal(ours.project_in.weight, peer.project_in.weight)
    assert (ours.decay, ours.commitment_weight, ours.rotation_trick) == (0.8, 1.0, True)
    with pytest.raises(ValueError, match="commitment_use_cross_entropy_loss"):
        VectorQuantizer.from_vector_quantize(vqp.VectorQuantize(dim=DIM, codebook_size=K, commitment_use_cross_entropy_loss=True))
    with pytest.raises(ValueError, match="layernorm_after_project_in"):
        VectorQuantizer.from_vector_quantize(vqp.VectorQuantize(dim=DIM, codebook_size=K, codebook_dim=4, layernorm_after_project_in=True))


def test_orthogonal_loss_never_builds_k_by_k(monkeypatch):
    """At K = 4096 the loss is the [d, d] Gram form: equal to the peer's K x K formula."""
    from vector_quantize_pytorch.vector_quantize_pytorch import orthogonal_loss_fn

    from vqdna.models.quantizer import _orthogonal_loss

    book = torch.randn(1, 4096, 16, generator=torch.Generator().manual_seed(5))
    _close(_orthogonal_loss(book), orthogonal_loss_fn(book), "orthogonal loss")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_stochastic_sampling_is_seeded_and_reproducible(backend, monkeypatch):
    """Also on the Triton backend (what "auto" takes on CUDA; here under the interpreter): its own
    Philox draws, seeded from the global generator, with the module unchanged."""
    if backend == "triton":
        from tests.conftest import require_backend

        require_backend("triton", "cpu", "sample_codes")
        monkeypatch.setenv("VQDNA_BACKEND", "triton")
    else:
        monkeypatch.delenv("VQDNA_BACKEND", raising=False)
    _, ours = _pair(stochastic_sample_codes=True)
    ours.train().freeze_codebook = True
    x = torch.randn(4, 30, DIM, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    a = ours(x)[1]
    torch.manual_seed(7)
    b = ours(x)[1]
    c = ours(x)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert kernels.dispatch.last_backend("sample_codes") == (
        "triton" if backend == "triton" else kernels.dispatch.available_backends("cpu", "sample_codes")[0])
    ours.eval()  # eval: the nearest code, no sampling
    ours.stochastic_sample_codes = False
    nearest = ours(x)[1]
    ours.stochastic_sample_codes = True
    assert torch.equal(ours(x)[1], nearest) and not torch.equal(a, nearest)


@pytest.mark.parametrize("case", list(CASES))
def test_options_step_reads_nothing_back(case):
    _, ours = _pair(**CASES[case])
    ours.check_finite = "assert"
    ours.train()
    x = torch.randn(2, 12, DIM, requires_grad=True)
    mask = torch.rand(2, 12) < 0.7
    ours(x, mask=mask)
    with _NoHostReads():
        out, _, loss = ours(x, mask=mask)
        ((out * 2).sum() + loss).backward()
        ours.eval()
        ours(x, mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_options_compile_fullgraph(case):
    """torch.compile(fullgraph=True) traces a training step with the option (no graph break: no
    host read) and gives the eager codes, output and loss (sampling: compiled code draws its own
    noise, so only that it traces and picks valid codes)."""
    torch._dynamo.reset()
    _, ours = _pair(**CASES[case])
    ours.check_finite = "assert"
    ours.train()
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(9))
    mask = torch.rand(2, 12, generator=torch.Generator().manual_seed(10)) < 0.7
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(2):
        co, cc, cl = compiled(x, mask=mask)
        eo, ec, el = eager(x, mask=mask)
        if case.startswith("stochastic"):
            assert cc.shape == ec.shape and co.shape == eo.shape and torch.equal(cc < 0, ec < 0)  # -1: masked
            assert bool((cc < ours.codebook_size).all())
            continue
        assert torch.equal(cc, ec)
        _close(co, eo, f"{case} compiled output")
        _close(cl, el, f"{case} compiled loss")


@pytest.mark.parametrize("case", ["stochastic", "stochastic_heads", "stochastic_separate_heads"])
def test_sampling_in_row_blocks_draws_the_peers_noise(case, monkeypatch):
    """Rows sampled 7 at a time (not a divisor of the row count): the same codes as the peer's one
    [C, rows, K] draw under the same seed."""
    import vqdna.models.quantizer as quantizer

    monkeypatch.setattr(quantizer, "_SAMPLE_CHUNK", 7)
    peer, ours = _pair(**CASES[case])
    peer.train(), ours.train()
    x = torch.randn(3, 11, DIM, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(12)
    _, pc, _ = peer(x)
    torch.manual_seed(12)
    _, oc, _ = ours(x)
    assert torch.equal(oc, pc)


# heads * codebook_dim == DIM: no projection. No commitment loss: the peer's masked one fails with
# per-head codebooks (a shape error in its mse_loss, vector-quantize-pytorch 1.32), and these tests
# are about the codebook state.
SEPARATE = dict(heads=2, codebook_dim=4, separate_codebook_per_head=True, commitment_weight=0.0)


def _head_rows(x, mask, head):
    """Head `head`'s rows [n, codebook_dim] of x [..., DIM] (no projection), the unmasked ones."""
    z = x.unflatten(-1, (SEPARATE["heads"], SEPARATE["codebook_dim"]))[..., head, :]
    return z.reshape(-1, z.shape[-1]) if mask is None else z[mask]


def _is_row_of(codes, rows, atol):
    """[K] bool: each code equals (within atol) one of rows [n, d]."""
    return (codes[:, None] - rows[None]).abs().amax(-1).le(atol).any(-1)


@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "masked"])
def test_separate_heads_kmeans_init_is_per_head(masked):
    """kmeans_init with per-head codebooks: codebook c is k-means of head c's (unmasked) rows.
    Differs on purpose: the peer's k-means draws its initial centroids at random (global RNG), ours
    is kmeans++ from a fixed seed (and sets cluster_size to 1, the peer to the cluster counts), so the
    codebooks cannot be equal. Compared: the state's shapes and initted flag, and what k-means of
    head c's rows implies: every code of codebook c, ours and the peer's, is a mean of head c's
    unmasked rows, so inside their bounding box (the heads' rows are centred at +5 and -5 and masked
    rows at +50: the boxes are disjoint); ours is the spec's k-means (reference.kmeans) of those rows,
    and with 0 iterations (which the peer's kmeans does not run) each code is one of them."""
    from vqdna.kernels import reference

    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 20, DIM, generator=gen) + torch.tensor([5.0] * 4 + [-5.0] * 4)
    mask = None
    if masked:
        mask = torch.rand(3, 20, generator=gen) < 0.6
        x[~mask] = 50.0
    for iters in (0, 1, 3):
        peer, ours = _pair(kmeans_init=True, kmeans_iters=max(iters, 1), **SEPARATE)
        ours.kmeans_iters = iters
        assert ours.kmeans_init and ours.kmeans_pending()
        peer.train(), ours.train()
        peer(x, mask=mask, freeze_codebook=True)  # both: the k-means init only, no EMA step
        ours(x, mask=mask, freeze_codebook=True)
        assert not ours.kmeans_pending() and bool(peer._codebook.initted)
        for got, want in zip(_state(ours), _state(peer)):
            assert got.shape == want.shape
        for head in range(2):
            rows = _head_rows(x, mask, head)
            lo, hi = rows.amin(0) - 1e-4, rows.amax(0) + 1e-4
            mine = ours.codebook.detach()[head * K : (head + 1) * K]
            books = [(mine, "ours")] + ([(peer._codebook.embed.detach()[head], "peer")] if iters else [])
            for book, who in books:
                inside = ((book >= lo) & (book <= hi)).all(-1)
                assert bool(inside.all()), f"{who} ({iters} iterations): code {int((~inside).nonzero()[0])} of codebook {head} is not a mean of head {head}'s rows"
            if iters == 0:
                assert bool(_is_row_of(mine, rows, 0.0).all()), f"codebook {head}: a code that is not a row of head {head}"
            else:
                _close(mine, reference.kmeans(rows, K, iters), f"codebook {head}: k-means of head {head}'s rows")


@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "masked"])
def test_separate_heads_dead_code_restarts_from_their_heads_rows(masked):
    """threshold_ema_dead_code with per-head codebooks: the dead codes of codebook c restart from
    (unmasked) rows of head c, ours and the peer's. Differs on purpose (as with one codebook): the
    peer picks the rows at random, we by a hash of head c's codes; the live codes' state is the peer's."""
    peer, ours = _pair(threshold_ema_dead_code=1.0, **SEPARATE)
    peer.train(), ours.train()
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 12, DIM, generator=gen)
    mask = (torch.rand(2, 12, generator=gen) < 0.7) if masked else None
    codes = ours(x, mask=mask, freeze_codebook=True)[1]  # [2, 12, heads]
    keep = torch.ones(2, 12, dtype=torch.bool) if mask is None else mask
    counts = torch.cat([torch.bincount(codes[..., h][keep], minlength=K) for h in range(2)])
    dead = _state(peer)[1] * 0.8 + 0.2 * counts < 1.0  # [heads * K] after this step's EMA
    peer(x, mask=mask), ours(x, mask=mask)
    for h in range(2):
        assert 0 < int(dead[h * K : (h + 1) * K].sum()) < K, f"head {h}: the test needs dead and live codes"
    for (got, want), what in zip(zip(_state(ours), _state(peer)), ("codebook", "cluster_size", "embed_sum")):
        _close(got[~dead], want[~dead], f"live {what}")
    for module in (ours, peer):
        book, size, total = _state(module)
        assert bool((size[dead] == 1.0).all())
        _close(total[dead], book[dead], "restarted embed_sum")
        for h in range(2):
            dead_h = dead[h * K : (h + 1) * K]
            restarted = book[h * K : (h + 1) * K][dead_h]
            who = type(module).__name__
            assert bool(_is_row_of(restarted, _head_rows(x, mask, h), 1e-6).all()), f"{who}: codebook {h} restarted off head {h}'s rows"
            assert not bool(_is_row_of(restarted, _head_rows(x, mask, 1 - h), 1e-6).any()), f"{who}: codebook {h} took the other head's rows"
