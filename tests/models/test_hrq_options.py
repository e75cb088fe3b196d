"""HRQuantizer's vector-quantize-pytorch options (issue 23), each against an explicit level-by-level
torch computation of docs/design.md §2.2 with the option: codes, zhat, loss, gradients and the state
after a training step. There is no peer HRQ, so no peer parity here."""

import copy

import pytest
import torch

import vqdna.models.quantizer as quantizer
from tests.models.test_quantizer import _NoHostReads
from vqdna import HRQuantizer
from vqdna.kernels import reference

D, SIZES, CW = 6, (4, 9), 0.9


def _zs(seed, shape=(3, 7), n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, D, generator=g).requires_grad_() for _ in range(n)]


def _mask(seed, shape=(3, 7)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.6


def _state(h):
    return {k: v.detach().clone() for k, v in h.state_dict().items()}


def _cummeans(rows):
    """The cumulative means of per-level rows (float32 sums, as the fused op)."""
    out, running = [], None
    for level, r in enumerate(rows):
        running = r if running is None else running + r
        out.append(running / (level + 1))
    return out


def _commitment(zs, targets, mask):
    """commitment weight * sum_l masked mean((Z_l - target_l)^2)."""
    m = torch.ones(zs[0].shape[:-1]) if mask is None else mask.float()
    return CW * sum(((z - t).pow(2) * m[..., None]).sum() / (m.sum() * D) for z, t in zip(zs, targets))


def _gumbel_codes(h, book, temp):
    """The peer's stochastic_sample_codes on one level: argmax(-dist / temp + gumbel) with its draws
    (u [N, K] row-major from the global generator)."""
    dist = torch.cdist(h.reshape(-1, D).double(), book.double()).float()
    u = torch.empty(dist.shape).uniform_(0, 1)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (-dist.clamp_min(1e-4) / temp + gumbel).argmax(-1).view(h.shape[:-1])


# -- the default: one fused pass ------------------------------------------------------------------

def test_default_is_one_fused_pass(monkeypatch):
    """No options: hrq_quantize once per forward, no per-level lookup, sampling or extra loss pass."""
    calls = []
    for name in ("hrq_quantize", "lookup", "sample_codes"):
        fn = getattr(quantizer.kernels, name)
        monkeypatch.setattr(quantizer.kernels, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    monkeypatch.setattr(quantizer.kernels.reference, "hrq_level_losses", None)  # would fail if called
    h = HRQuantizer(D, SIZES).train()
    h(_zs(0), mask=_mask(1))
    h.eval()(_zs(2))
    assert calls == ["hrq_quantize", "hrq_quantize"]


# -- stochastic_sample_codes / sample_codebook_temp ------------------------------------------------

@pytest.mark.parametrize("sample, temp", [(True, 1.0), ((False, True), (1.0, 0.5)), ((True, False), 0.7)],
                         ids=["both", "level1", "level0"])
def test_stochastic_sampling_level_by_level(sample, temp):
    """Training codes: level l sampled over -||H_l - e|| / temp, H_l from level l-1's SAMPLED code;
    zhat, the loss, the straight-through gradients and the EMA state on those H_l."""
    h = HRQuantizer(D, SIZES, decay=0.8, stochastic_sample_codes=sample, sample_codebook_temp=temp).train()
    before = _state(h)
    zs, mask = _zs(3), _mask(4)
    torch.manual_seed(5)
    zhat, codes, loss = h(zs, mask=mask)
    w = torch.randn(zhat.shape, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad((zhat * w).sum() + loss, zs)

    samples = quantizer._per_level("s", sample, 2, bool)
    temps = quantizer._per_level("t", temp, 2, float)
    books = [before[f"levels.{i}.codebook"] for i in range(2)]
    torch.manual_seed(5)
    want, hs, prev = [], [], None
    for level, z in enumerate(zs):
        hl = z.detach() if level == 0 else 2 * zs[level].detach() - books[level - 1][prev]
        if samples[level]:
            c = _gumbel_codes(hl, books[level], temps[level])
        else:
            c = reference.lookup(hl.reshape(-1, D), books[level])[0].long().view(hl.shape[:-1])
        want.append(c)
        hs.append(hl)
        prev = c
    assert torch.equal(codes, torch.stack(want))
    targets = _cummeans([books[i][want[i]] for i in range(2)])
    torch.testing.assert_close(zhat, targets[-1])
    ref_zs = [z.detach().clone().requires_grad_() for z in zs]
    ref_loss = _commitment(ref_zs, targets, mask)
    torch.testing.assert_close(loss, ref_loss)
    ref_grads = torch.autograd.grad((w * (ref_zs[0] + 2 * ref_zs[1])).sum() / 2 + ref_loss, ref_zs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    for level in range(2):
        cs, es, cb = reference.ema_update(hs[level][mask], want[level][mask], before[f"levels.{level}.cluster_size"],
                                          before[f"levels.{level}.embed_sum"], decay=0.8, eps=1e-5)
        torch.testing.assert_close(h.levels[level].codebook, cb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h.levels[level].cluster_size, cs)


def test_sampling_is_seeded_nearest_in_eval_and_as_temp_goes_to_zero():
    h = HRQuantizer(D, (16, 16), stochastic_sample_codes=True, freeze_codebook=True).train()
    zs = [z.detach() for z in _zs(7, shape=(40,))]
    torch.manual_seed(8)
    a = h(zs)[1]
    torch.manual_seed(8)
    b = h(zs)[1]
    c = h(zs)[1]
    nearest = h.eval()(zs)[1]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, nearest)
    ref_codes, _ = reference.hrq_quantize(zs, h.codebooks)
    assert torch.equal(nearest, ref_codes.long())  # eval: the fused nearest codes
    h.train().sample_codebook_temp = 1e-7
    assert torch.equal(h(zs)[1], nearest)
    h.sample_codebook_temp = 0.0  # as the peer: temp 0 is no sampling
    assert torch.equal(h(zs)[1], nearest)


# -- learnable_codebook / ema_update / freeze_codebook ---------------------------------------------

@pytest.mark.parametrize("learnable", [True, (True, False), (False, True)], ids=["both", "level0", "level1"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
def test_learnable_codebooks_get_the_commitment_gradient(learnable, masked):
    """The loss's targets zhat^(l) = mean_{m<=l} C_m[M_m] carry the gradient to the learnable levels'
    codebooks (parameters, no EMA); zhat stays straight-through; the other levels keep their EMA."""
    h = HRQuantizer(D, SIZES, commitment_weight=CW, decay=0.8, learnable_codebook=learnable).train()
    flags = quantizer._per_level("l", learnable, 2, bool)
    before = _state(h)
    zs, mask = _zs(9), _mask(10) if masked else None
    zhat, codes, loss = h(zs, mask=mask)
    w = torch.randn(zhat.shape, generator=torch.Generator().manual_seed(11))
    ((zhat * w).sum() + loss).backward()

    books = [before[f"levels.{i}.codebook"].clone().requires_grad_(flags[i]) for i in range(2)]
    ref_codes, _ = reference.hrq_quantize([z.detach().reshape(-1, D) for z in zs], [b.detach() for b in books])
    assert torch.equal(codes, ref_codes.long().view(codes.shape))
    ref_zs = [z.detach().clone().requires_grad_() for z in zs]
    targets = _cummeans([torch.nn.functional.embedding(codes[i], books[i]) for i in range(2)])
    ref_loss = _commitment(ref_zs, targets, mask)
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    ((w * (ref_zs[0] + 2 * ref_zs[1])).sum() / 2 + ref_loss).backward()
    for z, r in zip(zs, ref_zs):
        torch.testing.assert_close(z.grad, r.grad)
    for level, state in enumerate(h.levels):
        assert isinstance(state.codebook, torch.nn.Parameter) == flags[level]
        if flags[level]:
            assert state.codebook.grad is not None and bool(state.codebook.grad.abs().sum() > 0)
            torch.testing.assert_close(state.codebook.grad, books[level].grad)
            torch.testing.assert_close(state.codebook.detach(), before[f"levels.{level}.codebook"], rtol=0, atol=0)
            assert torch.equal(state.cluster_size, before[f"levels.{level}.cluster_size"])  # no EMA
        else:
            assert not torch.equal(state.codebook, before[f"levels.{level}.codebook"])  # EMA ran


def test_ema_update_false_and_frozen_leave_the_codebooks():
    """ema_update=False: the codebooks stay (the statistics still move, for restarts, as the peer);
    freeze_codebook (constructor, per level, or per call): nothing of the level's state changes."""
    zs, mask = _zs(12), _mask(13)
    h = HRQuantizer(D, SIZES, ema_update=False, threshold_ema_dead_code=0.5).train()
    before = _state(h)
    h(zs, mask=mask)
    for level in range(2):
        assert torch.equal(h.levels[level].codebook, before[f"levels.{level}.codebook"])
        assert not torch.equal(h.levels[level].cluster_size, before[f"levels.{level}.cluster_size"])
    for frozen, call in (((True, False), None), (True, None), (None, True), (None, (False, True))):
        h = HRQuantizer(D, SIZES, threshold_ema_dead_code=2.0, freeze_codebook=frozen or False).train()  # all dead
        before = _state(h)
        h(zs, mask=mask, freeze_codebook=call)
        flags = quantizer._per_level("f", call if call is not None else frozen, 2, bool)
        for level in range(2):
            same = [torch.equal(v, before[k]) for k, v in h.state_dict().items() if k.startswith(f"levels.{level}.")]
            assert all(same) if flags[level] else not all(same), (frozen, call, level)


def test_frozen_learnable_codebook_gets_no_gradient():
    h = HRQuantizer(D, SIZES, learnable_codebook=True).train()
    _, _, loss = h(_zs(14), freeze_codebook=True)
    loss.backward()
    assert all(state.codebook.grad is None for state in h.levels)


# -- orthogonal_reg_weight (+ active codes only, max codes) ----------------------------------------

def _orthogonal_explicit(book):
    """The peer's orthogonal_loss_fn on one codebook [K, d], the K x K way."""
    normed = torch.nn.functional.normalize(book, dim=-1, eps=1e-6)
    n = book.shape[0]
    return (normed @ normed.T).pow(2).sum() / n**2 - 1.0 / n


@pytest.mark.parametrize("weight, active, max_codes", [(0.3, False, None), ((0.0, 0.5), True, None),
                                                       ((0.2, 0.4), False, (3, None))],
                         ids=["plain", "active-level1", "max-codes-level0"])
def test_orthogonal_regularisation_per_level(weight, active, max_codes):
    """The loss adds sum_l weight_l * the peer's orthogonality loss of level l's codebook (over the
    codes used in the batch, or max_codes random codes drawn by torch.randperm level after level),
    with its gradient to the codebook (a parameter where the weight is > 0)."""
    h = HRQuantizer(D, SIZES, orthogonal_reg_weight=weight, orthogonal_reg_active_codes_only=active,
                    orthogonal_reg_max_codes=max_codes, freeze_codebook=True).train()
    zs = _zs(15)
    with torch.no_grad():
        commit = copy.deepcopy(h).eval()(zs)[2]  # the commitment term alone
    torch.manual_seed(16)
    _, codes, loss = h(zs)
    loss.backward()
    weights = quantizer._per_level("w", weight, 2, float)
    actives = quantizer._per_level("a", active, 2, bool)
    maxes = quantizer._per_level("m", max_codes, 2, quantizer._optional_int)
    books = [state.codebook.detach().clone().requires_grad_() for state in h.levels]
    torch.manual_seed(16)
    want = commit
    for level, book in enumerate(books):
        assert isinstance(h.levels[level].codebook, torch.nn.Parameter) == (weights[level] > 0)
        if weights[level] == 0:
            continue
        rows = book
        if actives[level]:
            rows = book[torch.zeros(book.shape[0], dtype=torch.bool).index_fill_(0, codes[level].reshape(-1), True)]
        elif maxes[level] is not None:
            rows = book[torch.randperm(book.shape[0])[:maxes[level]]]
        want = want + weights[level] * _orthogonal_explicit(rows)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    for level, book in enumerate(books):
        if weights[level] > 0:
            torch.testing.assert_close(h.levels[level].codebook.grad, book.grad)


# -- rotation_trick ---------------------------------------------------------------------------------

def _rotate_to(src, tgt):
    """vector-quantize-pytorch's rotate_to, written out: tgt in value, the gradient to src through the
    rotation taking src/|src| to tgt/|tgt| and the scale |tgt|/|src| (both held constant)."""
    ns, nt = src.norm(dim=-1, keepdim=True), tgt.norm(dim=-1, keepdim=True)
    u, q = (src / ns.clamp_min(1e-6)).detach(), (tgt / nt.clamp_min(1e-6)).detach()
    w = torch.nn.functional.normalize(u + q, dim=-1, eps=1e-6).detach()
    dot = lambda a, b: (a * b).sum(-1, keepdim=True)  # noqa: E731
    rotated = src - 2 * dot(src, w) * w + 2 * dot(src, u) * q
    return rotated * (nt / ns.clamp_min(1e-6)).detach()


@pytest.mark.parametrize("rotate", [True, (False, True)], ids=["both", "level1"])
def test_rotation_trick_per_level(rotate):
    """zhat = mean_l rot_l(H_l) in value the fused zhat; the gradient to H_l through the rotation to its
    code vector (straight-through at the other levels), then to Z_l (x 2 for l >= 1)."""
    h = HRQuantizer(D, SIZES, rotation_trick=rotate).eval()
    zs = _zs(17)
    zhat, codes, _ = h(zs)
    w = torch.randn(zhat.shape, generator=torch.Generator().manual_seed(18))
    grads = torch.autograd.grad((zhat * w).sum(), zs)
    with torch.no_grad():  # no gradient needed: the fused op's output
        fused = h(zs)[0]
    torch.testing.assert_close(zhat, fused, rtol=0, atol=0)

    flags = quantizer._per_level("r", rotate, 2, bool)
    ref_zs = [z.detach().clone().requires_grad_() for z in zs]
    books = h.codebooks
    outs = []
    for level, z in enumerate(ref_zs):
        hl = z if level == 0 else 2 * z - books[level - 1][codes[level - 1]]
        hhat = books[level][codes[level]]
        outs.append(_rotate_to(hl, hhat) if flags[level] else hl + (hhat - hl).detach())
    ref = (outs[0] + outs[1]) / 2
    torch.testing.assert_close(ref, zhat)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_zs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    plain = HRQuantizer(D, SIZES).eval()
    plain.load_state_dict(h.state_dict())
    straight = torch.autograd.grad((plain(ref_zs)[0] * w).sum(), ref_zs)
    assert not torch.allclose(straight[1], grads[1])  # the option changes the gradient


# -- layouts, masked padding, refused options ------------------------------------------------------

@pytest.mark.parametrize("option, shape", [("channel_last", (2, D, 5)), ("accept_image_fmap", (2, D, 3, 4)),
                                           ("accept_3d_fmap", (2, D, 2, 3, 2))])
def test_channel_first_layouts_are_views(option, shape, monkeypatch):
    kw = {option: option != "channel_last"}
    h = HRQuantizer(D, SIZES, **kw).train()
    ref = copy.deepcopy(h)
    ref.channel_last, ref.accept_image_fmap, ref.accept_3d_fmap = True, False, False
    g = torch.Generator().manual_seed(19)
    zs = [torch.randn(shape, generator=g).requires_grad_() for _ in range(2)]
    seen = []
    fused = quantizer.kernels.hrq_quantize
    monkeypatch.setattr(quantizer.kernels, "hrq_quantize", lambda z, *a, **k: seen.extend(z) or fused(z, *a, **k))
    zhat, codes, loss = h(zs)
    # the module hands the op strided views of the caller's tensors (no copy of its own)
    assert [t.data_ptr() for t in seen] == [z.data_ptr() for z in zs] and not seen[0].is_contiguous()
    ref_zs = [z.detach().movedim(1, -1).contiguous().requires_grad_() for z in zs]
    rz, rc, rl = ref(ref_zs)
    assert zhat.shape == shape and codes.shape == (2, shape[0], *shape[2:])
    assert torch.equal(codes, rc) and torch.equal(zhat, rz.movedim(-1, 1))
    torch.testing.assert_close(loss, rl)
    w = torch.randn(zhat.shape, generator=g)
    grads = torch.autograd.grad((zhat * w).sum() + loss, zs)
    ref_grads = torch.autograd.grad((rz * w.movedim(1, -1)).sum() + rl, ref_zs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.movedim(-1, 1))
    _assert_states_equal(h, ref)
    with pytest.raises(ValueError, match=r"zs\[0\] has shape"):
        HRQuantizer(D, SIZES, accept_image_fmap=True)([torch.randn(2, D, 5)] * 2)


def _assert_states_equal(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=k)


def test_return_zeros_for_masked_padding():
    zs, mask = _zs(20), _mask(21)
    h = HRQuantizer(D, SIZES, return_zeros_for_masked_padding=True).eval()
    zhat, codes, loss = h(zs, mask=mask)
    plain = HRQuantizer(D, SIZES).eval()
    plain.load_state_dict(h.state_dict())
    pz, pc, pl = plain(zs, mask=mask)
    assert torch.equal(zhat[mask], pz[mask]) and bool((zhat[~mask] == 0).all())
    assert torch.equal(codes[:, mask], pc[:, mask]) and bool((codes[:, ~mask] == -1).all())
    torch.testing.assert_close(loss, pl)
    (g,) = torch.autograd.grad(zhat.sum(), zs[1])
    assert bool((g[~mask] == 0).all()) and bool((g[mask] == 1).all())
    with pytest.raises(ValueError, match="return_zeros_for_masked_padding=False is not offered"):
        HRQuantizer(D, SIZES, return_zeros_for_masked_padding=False)


@pytest.mark.parametrize("kw, match", [(dict(use_cosine_sim=True), "use_cosine_sim=True is not offered: the doubled"),
                                       (dict(heads=2), "heads=2 is not offered"),
                                       (dict(separate_codebook_per_head=True), "separate_codebook_per_head"),
                                       (dict(codebook_dim=3), "codebook_dim=3 is not offered"),
                                       (dict(sample_codebook_temp=(1.0, 0.5, 0.2)), "3 values for 2 levels"),
                                       (dict(learnable_codebook=(True, False), ema_update=True), "ema_update=True"),
                                       (dict(accept_image_fmap=True, accept_3d_fmap=True), "exclusive")])
def test_options_that_do_not_apply_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        HRQuantizer(D, SIZES, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_cosine'"):
        HRQuantizer(D, SIZES, use_cosine=True)
    HRQuantizer(D, SIZES, use_cosine_sim=False, heads=1, codebook_dim=D)  # the "off" values are accepted


# -- no host sync, torch.compile ---------------------------------------------------------------------

_CASES = {
    "learnable_rotation": dict(learnable_codebook=(True, False), rotation_trick=True),
    "orthogonal_active": dict(orthogonal_reg_weight=0.3, orthogonal_reg_active_codes_only=True),
    "orthogonal_max_codes": dict(orthogonal_reg_weight=(0.3, 0.1), orthogonal_reg_active_codes_only=(True, False),
                                 orthogonal_reg_max_codes=3),
    "sampled": dict(stochastic_sample_codes=(False, True), sample_codebook_temp=0.5, threshold_ema_dead_code=1.0),
    "layout_padding": dict(channel_last=False, return_zeros_for_masked_padding=True, ema_update=False,
                           threshold_ema_dead_code=1.0, freeze_codebook=(False, True)),
}


def _case_inputs(case, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (2, D, 12) if case == "layout_padding" else (2, 12, D)
    zs = [torch.randn(shape, generator=g).requires_grad_() for _ in range(2)]
    return zs, torch.rand(2, 12, generator=g) < 0.7


@pytest.mark.parametrize("case", list(_CASES))
def test_option_steps_read_nothing_back(case):
    h = HRQuantizer(D, SIZES, check_finite="assert", **_CASES[case]).train()
    h(*_case_inputs(case, 0))
    with _NoHostReads():
        zs, mask = _case_inputs(case, 1)
        zhat, _, loss = h(zs, mask=mask)
        ((zhat * 2).sum() + loss).backward()
        h.eval()
        h(*_case_inputs(case, 2))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_CASES))
def test_option_steps_compile_fullgraph(case):
    """torch.compile(fullgraph=True) of training steps with the options: no graph break, the eager
    codes, output, loss, gradients (to the zs and the codebook parameters) and state. With the EMA
    rewriting the codebooks in the step, this catches a backward that reads them again (see
    quantizer._saved). Random draws (sampling, max codes) differ in compiled code: traced only."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    h = HRQuantizer(D, SIZES, check_finite="assert", **_CASES[case]).train()
    eager = copy.deepcopy(h)
    compiled = torch.compile(h, fullgraph=True)
    for seed in (1, 2):
        zs, mask = _case_inputs(case, seed)
        if case in ("sampled", "orthogonal_max_codes"):
            cz, cc, cl = compiled(zs, mask=mask)
            ((cz * 2).sum() + cl).backward()
            assert cc.shape == (2, 2, 12) and bool(torch.isfinite(cl))
            continue
        ezs = [z.detach().clone().requires_grad_() for z in zs]
        torch.manual_seed(seed)
        cz, cc, cl = compiled(zs, mask=mask)
        torch.manual_seed(seed)
        ez, ec, el = eager(ezs, mask=mask)
        assert torch.equal(cc, ec)
        torch.testing.assert_close(cz, ez)
        torch.testing.assert_close(cl, el)
        cp = [p for p in h.parameters()]
        ep = [p for p in eager.parameters()]
        gc = torch.autograd.grad((cz * 2).sum() + cl, zs + cp)
        ge = torch.autograd.grad((ez * 2).sum() + el, ezs + ep)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)
    if case not in ("sampled", "orthogonal_max_codes"):
        _assert_states_equal(h, eager)
