"""VQDNA BERT (vqdna/models/bert.py): ALiBi attention backends vs the reference, embeddings, heads, parameter
count, padding invariance, save/load through the transformers Auto classes."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import ATTENTION_ATOL
from vqdna.models import bert
from vqdna.models.bert import (
    CLS, MASK, PAD, SEP, VQDNAConfig, VQDNAForMaskedLM, VQDNAForSequenceClassification, VQDNAModel, alibi_slopes,
    build_inputs, reference_attention, sdpa_attention, special_ids,
)

SIZES = [4, 8]  # tiny two-level vocabulary for model tests
TINY = dict(codebook_sizes=SIZES, codebook_dim=6, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32)


def naive_attention(q, k, v, slopes, mask):
    """float64 loops straight from the formula: softmax_j(q_i.k_j / sqrt(d) - slope_h |i - j|, masked keys out)."""
    b, h, length, d = q.shape
    out = torch.zeros(b, h, length, d, dtype=torch.float64)
    for bi in range(b):
        keep = [j for j in range(length) if mask is None or bool(mask[bi, j])]
        for hi in range(h):
            for i in range(length):
                s = torch.stack([q[bi, hi, i].double() @ k[bi, hi, j].double() / math.sqrt(d)
                                 - float(slopes[hi]) * abs(i - j) for j in keep])
                p = torch.softmax(s, 0)
                out[bi, hi, i] = sum(p[n] * v[bi, hi, j].double() for n, j in enumerate(keep))
    return out


def random_mask(b, length, g):
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    return torch.arange(length)[None] < lengths[:, None]


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then every other 16-head slope
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 * (2 * i + 1)) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(want))


def test_reference_attention_matches_formula(rng):
    q, k, v = (torch.randn(2, 3, 7, 5, generator=rng) for _ in range(3))
    mask = random_mask(2, 7, rng)
    slopes = alibi_slopes(3)
    got = reference_attention(q, k, v, slopes, mask)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, slopes, mask), atol=1e-5, rtol=0)
    got = reference_attention(q, k, v, slopes, None)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, slopes, None), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 4, 7, 16), (3, 12, 33, 64), (2, 3, 130, 24)])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_reference(shape, padded, rng, poison):
    b, h, length, d = shape
    q, k, v = (torch.randn(*shape, generator=rng) for _ in range(3))
    mask = random_mask(b, length, rng) if padded else None
    slopes = alibi_slopes(h)
    want = reference_attention(q, k, v, slopes, mask)
    got = sdpa_attention(q, k, v, slopes, mask)
    torch.testing.assert_close(got, want, atol=ATTENTION_ATOL[torch.float32], rtol=0)
    # the ALiBi bias matters: without it the outputs differ (L > 1)
    assert length == 1 or not torch.allclose(want, reference_attention(q, k, v, slopes * 0, mask), atol=1e-3)


def test_attention_ties_and_nonfinite(rng):
    # identical keys (ties everywhere): attention is the ALiBi-weighted mean of values
    q = torch.randn(1, 2, 5, 4, generator=rng)
    k = torch.ones(1, 2, 5, 4)
    v = torch.randn(1, 2, 5, 4, generator=rng)
    slopes = alibi_slopes(2)
    torch.testing.assert_close(sdpa_attention(q, k, v, slopes), reference_attention(q, k, v, slopes), atol=2e-5, rtol=0)
    # a NaN query row stays NaN on every backend and does not leak into other rows
    q[0, 1, 3, 0] = float("nan")
    for fn in (reference_attention, sdpa_attention):
        out = fn(q, k, v, slopes)
        assert out[0, 1, 3].isnan().all() and out[0, 0].isfinite().all() and out[0, 1, :3].isfinite().all()


def test_explicit_flash_without_flash_attn_raises():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="flash"):
        bert.alibi_attention(q, q, q, alibi_slopes(2), None, backend="flash")


@pytest.mark.cuda
def test_flash_matches_reference_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not bert.flash_available():
        pytest.skip("flash_attn not installed")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 77, 64, generator=g).cuda().bfloat16() for _ in range(3))
    mask = random_mask(3, 77, g).cuda()
    slopes = alibi_slopes(4, device="cuda")
    want = reference_attention(q, k, v, slopes, mask)
    got = bert.flash_attention(q, k, v, slopes, mask)
    keep = mask[:, None, :, None].expand_as(want)
    torch.testing.assert_close(got[keep].float(), want[keep].float(), atol=ATTENTION_ATOL[torch.bfloat16], rtol=0)


def test_build_inputs_layout():
    codes = [torch.tensor([[1, 2], [3, 4], [0, 7]]), torch.tensor([[2, 5]])]
    ids, mask = build_inputs(codes, SIZES)
    assert ids.shape == (2, 5, 2) and ids.dtype == torch.int64
    assert ids[0, 0].tolist() == special_ids(SIZES, CLS) and ids[0, 4].tolist() == special_ids(SIZES, SEP)
    assert ids[0, 1:4].tolist() == codes[0].tolist()
    assert ids[1, 2].tolist() == special_ids(SIZES, SEP) and ids[1, 3:].tolist() == [special_ids(SIZES, PAD)] * 2
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert build_inputs(codes, SIZES, pad_to_multiple_of=8)[0].shape == (2, 8, 2)
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        build_inputs([codes[0], torch.zeros(3, 3)], SIZES)


def tiny_model(cls=VQDNAModel, **kw):
    torch.manual_seed(0)
    return cls(VQDNAConfig(**{**TINY, **kw})).eval()


def random_ids(b, length, g):
    codes = [torch.stack([torch.randint(0, k, (n,), generator=g) for k in SIZES], 1)
             for n in torch.randint(1, length + 1, (b,), generator=g).tolist()]
    return codes, *build_inputs(codes, SIZES)


def test_embedding_codes_and_specials(rng):
    model = tiny_model()
    emb = model.embeddings
    codes, ids, mask = random_ids(3, 6, rng)
    ids[0, 2] = torch.tensor(special_ids(SIZES, MASK))
    ids[1, -1] = torch.tensor(special_ids(SIZES, PAD))  # a PAD whatever the drawn lengths
    emb.eval()
    got = emb(ids)
    c0, c1 = emb.codebooks
    # code positions: projection of the mean of the level embeddings; special ones: their learned row
    want_code = emb.proj((c0[ids[1, 1, 0]] + c1[ids[1, 1, 1]]) / 2)
    torch.testing.assert_close(got[1, 1], emb.LayerNorm(want_code))
    torch.testing.assert_close(got[0, 2], emb.LayerNorm(emb.special.weight[MASK]))
    torch.testing.assert_close(got[2, 0], emb.LayerNorm(emb.special.weight[CLS]))
    # every position, PAD included (padded rows' PAD positions must take PAD's row, not a clamped code)
    specials = ids[..., 0] - SIZES[0]
    assert set(specials[specials >= 0].tolist()) == {PAD, CLS, SEP, MASK}, "the ids must hold every special"
    want = torch.stack([torch.stack([emb.special.weight[s] if s >= 0 else emb.proj((c0[i[0]] + c1[i[1]]) / 2)
                                     for s, i in zip(row_s.tolist(), row)]) for row_s, row in zip(specials, ids)])
    torch.testing.assert_close(got, emb.LayerNorm(want))
    assert not any(cb.requires_grad for cb in emb.codebooks) and all(cb.std() > 0.5 for cb in emb.codebooks)


@pytest.mark.parametrize("bad,where", [((0, 9), "level 1"), ((-1, 2), "level 0"), ((4 + CLS, 3), "level 1"),
                                       ((5, 8 + 3), "consistent")])
def test_bad_ids_name_row_and_position(bad, where):
    model = tiny_model()
    ids, _ = build_inputs([torch.zeros(3, 2, dtype=torch.long)] * 2, SIZES)
    ids[1, 2] = torch.tensor(bad)
    with pytest.raises(ValueError, match=rf"row 1, position 2, {where if 'level' in where else ''}") as e:
        model(ids)
    assert where in str(e.value)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_padded_record_encodes_as_alone(backend, rng):
    model = tiny_model(attention_backend=backend)
    codes, ids, mask = random_ids(4, 9, rng)
    batch = model(ids, mask).last_hidden_state
    for i, c in enumerate(codes):
        alone_ids, alone_mask = build_inputs([c], SIZES)
        alone = model(alone_ids, alone_mask).last_hidden_state[0]
        torch.testing.assert_close(batch[i, : len(c) + 2], alone, atol=1e-5, rtol=0)
    # the default mask (id != PAD) is the same mask
    torch.testing.assert_close(model(ids).last_hidden_state, batch)


def test_model_backends_agree(rng):
    ref = tiny_model(VQDNAForMaskedLM, attention_backend="reference")
    fast = tiny_model(VQDNAForMaskedLM, attention_backend="sdpa")
    fast.load_state_dict(ref.state_dict())
    _, ids, mask = random_ids(3, 11, rng)
    for a, b in zip(ref(ids, mask).logits, fast(ids, mask).logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_mlm_loss_is_mean_over_levels(rng):
    model = tiny_model(VQDNAForMaskedLM)
    codes, ids, mask = random_ids(3, 8, rng)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[0, 2] = ids[0, 2]
    out = model(ids, mask, labels=labels)
    assert [tuple(lg.shape) for lg in out.logits] == [(3, ids.shape[1], k) for k in SIZES]
    want = torch.stack([F.cross_entropy(lg.flatten(0, 1), labels[..., l].flatten(), ignore_index=-100)
                        for l, lg in enumerate(out.logits)]).mean()
    torch.testing.assert_close(out.loss, want)
    # no labelled position: zero loss, not NaN
    assert model(ids, mask, labels=torch.full_like(ids, -100)).loss.item() == 0.0


def test_sequence_classification_and_regression_losses(rng):
    _, ids, mask = random_ids(4, 6, rng)
    cls = tiny_model(VQDNAForSequenceClassification, num_labels=3)
    y = torch.tensor([0, 2, 1, 2])
    out = cls(ids, mask, labels=y)
    assert out.logits.shape == (4, 3) and cls.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    reg = tiny_model(VQDNAForSequenceClassification, num_labels=1)
    y = torch.randn(4, generator=rng)
    out = reg(ids, mask, labels=y)
    assert out.logits.shape == (4, 1) and reg.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], y))


@pytest.mark.parametrize("pooling", ["mean", "mean_layers", "mean_wide"])
def test_mean_pooling_ignores_padding(rng, pooling):
    clf = tiny_model(VQDNAForSequenceClassification, num_labels=2, classifier_pooling=pooling, classifier_width=24)
    if pooling == "mean_wide":  # a bias that moves every token's features (the default init's is 0)
        torch.nn.init.normal_(clf.token_layer[0].bias, std=0.5, generator=rng)
    codes, ids, mask = random_ids(3, 7, rng)
    batch = clf(ids, mask).logits
    for i, c in enumerate(codes):
        torch.testing.assert_close(batch[i], clf(*build_inputs([c], SIZES)).logits[0], atol=1e-5, rtol=0)
    states = clf.vqdna(ids, mask, output_hidden_states=True).hidden_states
    assert len(states) == clf.config.num_hidden_layers + 1
    if pooling == "mean_wide":  # relu(W x + b) of each token's states of every layer, then the token mean
        w, b = clf.token_layer[0].weight, clf.token_layer[0].bias
        chosen = [torch.relu(torch.cat(states, -1) @ w.T + b)]
        assert w.shape == (24, clf.config.hidden_size * len(states)) and clf.config.pooled_size == 24
    else:
        chosen = states if pooling == "mean_layers" else states[-1:]
        assert clf.config.pooled_size == clf.config.hidden_size * len(chosen)
        assert not hasattr(clf, "token_layer")
    pooled = torch.stack([torch.cat([h[i, : len(c) + 2].mean(0) for h in chosen]) for i, c in enumerate(codes)])
    assert pooled.shape[1] == clf.config.pooled_size
    torch.testing.assert_close(batch, clf.classifier(clf.pooler(pooled)))
    # hidden states are returned only when asked for, whichever pooling needs them
    assert clf(ids, mask).hidden_states is None and len(clf(ids, mask, output_hidden_states=True).hidden_states) == len(states)


@pytest.mark.parametrize("window", [2, 3, 9])
def test_wide_window_pools_every_window_of_real_tokens(rng, window):
    """classifier_window W: "mean_wide"'s token layer reads the states of W consecutive real tokens, token t's
    then t + 1's, ..., and the head's input is its mean over every such window; a window reaching padding does
    not count, so a padded sequence pools as alone, and one with fewer than W tokens pools to zeros."""
    clf = tiny_model(VQDNAForSequenceClassification, num_labels=2, classifier_pooling="mean_wide",
                     classifier_width=24, classifier_window=window)
    torch.nn.init.normal_(clf.token_layer[0].bias, std=0.5, generator=rng)
    codes, ids, mask = random_ids(4, 7, rng)
    assert clf.token_layer[0].weight.shape == (24, window * clf.config.layers_size) and clf.config.pooled_size == 24
    states = torch.cat(clf.vqdna(ids, mask, output_hidden_states=True).hidden_states, -1)
    w, b = clf.token_layer[0].weight, clf.token_layer[0].bias
    want = []
    for i, c in enumerate(codes):
        x = states[i, : len(c) + 2]  # CLS, the codes, SEP
        wins = [torch.cat(list(x[t : t + window])) for t in range(len(x) - window + 1)]
        want.append(torch.relu(torch.stack(wins) @ w.T + b).mean(0) if wins else torch.zeros(24))
    pooled = clf.pool(ids, mask)[0]
    torch.testing.assert_close(pooled, torch.stack(want), atol=1e-5, rtol=0)
    if window == 9:  # lengths 3..9 tokens: only a full-length one has a window
        assert [bool(p.any()) for p in pooled] == [len(c) + 2 >= 9 for c in codes]
    for i, c in enumerate(codes):
        torch.testing.assert_close(clf.pool(*build_inputs([c], SIZES))[0][0], pooled[i], atol=1e-5, rtol=0)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="classifier_pooling must be cls\\|mean\\|mean_layers\\|mean_wide"):
        VQDNAConfig(classifier_pooling="max")
    with pytest.raises(ValueError, match="classifier_width must be >= 1, got 0"):
        VQDNAConfig(classifier_width=0)
    with pytest.raises(ValueError, match="classifier_window must be >= 1, got 0"):
        VQDNAConfig(classifier_window=0)
    with pytest.raises(ValueError, match="classifier_strands must be forward\\|both"):
        VQDNAConfig(classifier_strands="reverse")


@pytest.mark.parametrize("pooling", ["cls", "mean", "mean_layers", "mean_wide"])
def test_both_strands_pool_the_mean_of_each_strands_features(rng, pooling):
    """classifier_strands "both": the head's input is the mean of the forward model's pooled features of
    input_ids and of rc_input_ids (one encoder pass over both); swapping the strands changes nothing;
    a missing or unexpected rc_input_ids, or one of another shape, is refused."""
    both = tiny_model(VQDNAForSequenceClassification, num_labels=2, classifier_pooling=pooling,
                      classifier_strands="both")
    one = tiny_model(VQDNAForSequenceClassification, num_labels=2, classifier_pooling=pooling)
    one.load_state_dict(both.state_dict())
    codes, ids, mask = random_ids(3, 7, rng)
    other = [c.flip(0) for c in codes]  # any codes of the same lengths stand in for the other strand
    rc_ids, rc_mask = build_inputs(other, SIZES, pad_to=ids.shape[1])
    pooled, out = both.pool(ids, mask, rc_input_ids=rc_ids, rc_attention_mask=rc_mask)
    want = (one.pool(ids, mask)[0] + one.pool(rc_ids, rc_mask)[0]) / 2
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=0)
    assert out.last_hidden_state.shape[0] == 6  # one pass over both strands
    logits = both(ids, mask, rc_input_ids=rc_ids, rc_attention_mask=rc_mask).logits
    torch.testing.assert_close(logits, both.classifier(both.pooler(want)), atol=1e-5, rtol=0)
    torch.testing.assert_close(both(rc_ids, rc_mask, rc_input_ids=ids, rc_attention_mask=mask).logits, logits,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(both(ids, rc_input_ids=rc_ids).logits, logits, atol=1e-5, rtol=0)  # default masks
    with pytest.raises(ValueError, match="needs rc_input_ids"):
        both(ids, mask)
    with pytest.raises(ValueError, match="classifier_strands is 'forward'"):
        one(ids, mask, rc_input_ids=rc_ids)
    with pytest.raises(ValueError, match="rc_input_ids shape"):
        both(ids, mask, rc_input_ids=rc_ids[:, :-1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("strands", ["forward", "both"])
@pytest.mark.parametrize("pooling", bert.POOLINGS)
def test_head_runs_in_its_own_dtype_under_autocast(rng, pooling, strands, device):
    """Under bf16 autocast (what the Trainer's bf16 does on a GPU) the encoder runs in bf16 and the head does not:
    the logits are float32 and equal the float32 head applied to that bf16 encoder's states. The pooler here
    standardises features whose spread is a few thousandths of their size, as the probe head's does (a token
    layer bias of 100): a bf16 mean or pooler input would move them by whole standard deviations."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    clf = tiny_model(VQDNAForSequenceClassification, num_labels=3, classifier_pooling=pooling,
                     classifier_strands=strands, classifier_width=24, classifier_window=2).to(device)
    codes, ids, mask = random_ids(5, 7, rng)
    ids, mask = ids.to(device), mask.to(device)
    kw = {}
    if strands == "both":
        rc = build_inputs([c.flip(0) for c in codes], SIZES, pad_to=ids.shape[1])
        kw["rc_input_ids"], kw["rc_attention_mask"] = rc[0].to(device), rc[1].to(device)
    with torch.no_grad():
        if pooling == "mean_wide":
            clf.token_layer[0].bias.add_(100.0)
        x = clf.pool(ids, mask, **kw)[0]
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        clf.pooler[0].weight.copy_(torch.diag(1 / std))
        clf.pooler[0].bias.copy_(-mean / std)
        seen = []
        hook = clf.vqdna.register_forward_hook(lambda module, args, out: seen.append(out))
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = clf(ids, mask, **kw).logits
        hook.remove()
        both_ids = torch.cat([ids, kw["rc_input_ids"]]) if kw else ids  # the rows the encoder read
        both_mask = torch.cat([mask, kw["rc_attention_mask"]]) if kw else mask
        float_states = clf.vqdna(both_ids, both_mask).last_hidden_state
        assert not torch.equal(seen[0].last_hidden_state.float(), float_states)  # the encoder did run in bf16
        clf.vqdna.forward = lambda *args, **kwargs: seen[0]  # the same bf16 states, the head outside autocast
        want = clf(ids, mask, **kw).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=0)


def test_bert_base_parameter_count():
    config = VQDNAConfig()  # defaults = BERT-base over a (64, 512)-code, 384-dim tokenizer
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 768, 12)
    with torch.device("meta"):
        model = VQDNAForMaskedLM(config)
    h, i, n = 768, 3072, 12
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    embed = 384 * h + h + 4 * h + 2 * h
    heads = h * h + h + 2 * h + (h + 1) * (64 + 512)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == n * layer + embed + heads
    assert 85e6 < trainable < 88e6  # the paper's ~86 M (plus the frozen tokenizer codebooks below)
    assert sum(b.numel() for b in model.buffers()) == (64 + 512) * 384  # frozen codebooks


def test_save_load_through_auto_classes(tmp_path, rng):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    import vqdna  # noqa: F401  (registration happens at import)

    model = tiny_model(VQDNAForMaskedLM)
    with torch.no_grad():
        model.vqdna.embeddings.codebooks[1].add_(3.0)  # not the init: must come back from the file
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VQDNAConfig)
    _, ids, mask = random_ids(2, 7, rng)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is VQDNAForMaskedLM
    for a, b in zip(model(ids, mask).logits, loaded(ids, mask).logits):
        torch.testing.assert_close(a, b)
    base = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(base(ids, mask).last_hidden_state, model.vqdna(ids, mask).last_hidden_state)
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert type(clf) is VQDNAForSequenceClassification
    torch.testing.assert_close(clf.vqdna.embeddings.codebooks[1], model.vqdna.embeddings.codebooks[1])
    assert not any(p.requires_grad for p in clf.buffers())
    assert not any("codebook" in n for n, p in clf.named_parameters())


def test_named_configs():
    assert VQDNAConfig.named("bert-tiny", codebook_sizes=[8]).codebook_sizes == [8]
    with pytest.raises(ValueError, match="bert-base"):
        VQDNAConfig.named("bert-huge")
    with pytest.raises(ValueError, match="attention_backend"):
        VQDNAConfig(attention_backend="xformers")
