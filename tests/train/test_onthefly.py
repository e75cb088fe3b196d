"""On-the-fly tokenization (vqdna.train.onthefly): the codes of every window drawn from raw sequences
equal what `vqdna tokenize` wrote for the same bases (record ends, N runs, short and empty records),
and the windows are laid out exactly as CodeWindows lays them out over the token files, so a seeded
sampler draws the same code windows from either."""

import numpy as np
import pytest
import torch

from tests.streaming.test_tokenize_files import LENGTHS, _check_near_ties, _tiny_model, one_thread  # noqa: F401 (fixture)
from vqdna.data import SequenceIndex, TokenDataset
from vqdna.streaming import tokenize_files
from vqdna.train.onthefly import GenomeWindows, OnTheFlyEncoder, OnTheFlyMLMCollator
from vqdna.train.pretrain import CodeWindows

# LENGTHS (empty, shorter than the halo, window +- 1, longer than a shard) plus a record that is mostly
# one N run, one that ends in an N run and one that is only N.
N_RUNS = [("nrun", "ACGT" * 10 + "N" * 150 + "GATTACA" * 5), ("ntail", "ACGTTGCA" * 12 + "n" * 70), ("allN", "N" * 40)]


def _fasta(path):
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGTACGTACGTNacgtRY", np.uint8)
    recs = [(f"r{i}", letters[rng.integers(0, len(letters), n)].tobytes().decode()) for i, n in enumerate(LENGTHS)]
    recs[3:3] = N_RUNS
    with open(path, "w") as f:
        for name, seq in recs:
            f.write(f">{name}\n" + "".join(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60)))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(model, SequenceIndex, TokenDataset) of one FASTA tokenized by tokenize_files (window 100,
    shards of 500 bases: windows of the trainer fall across the tokenizer's windows and shards)."""
    tmp = tmp_path_factory.mktemp("otf")
    fasta = _fasta(tmp / "in.fa")
    model = _tiny_model()
    tokenize_files([fasta], str(tmp / "tokens"), model, window=100, shard_bases=500, device="cpu", dtype="fp32")
    return model, SequenceIndex.build([fasta], cache=str(tmp / "cache")), TokenDataset(str(tmp / "tokens"))


@pytest.mark.parametrize("window", [7, 62])
def test_codes_equal_token_files(corpus, window):
    model, index, tokens = corpus
    fly = GenomeWindows(index, window, halo=model.receptive_radius)
    files = CodeWindows(tokens, window)
    assert np.array_equal(fly.index, files.index)  # same windows under the same numbers
    encode = OnTheFlyEncoder(model)
    got = {}
    for j0 in range(0, len(fly), 16):  # batched as the collator batches: padding must not leak in
        js = range(j0, min(j0 + 16, len(fly)))
        for j, codes in zip(js, encode([fly[j] for j in js])):
            got[j] = codes
    differing = 0
    for i in range(len(index)):
        js = np.flatnonzero(fly.index[:, 0] == i)
        want = tokens[i][1].astype(np.int64)
        have = torch.cat([got[j] for j in js]).numpy() if len(js) else np.zeros((0, want.shape[1]), np.int64)
        assert have.shape == want.shape, index.records[i].name
        for j in js:  # each window against the token files' window, as the trainer sees them
            assert got[j].shape == files[j].shape
        if not np.array_equal(have, want):
            differing += _check_near_ties(model, np.asarray(index.sequence(i)), have, want)
    assert differing <= 3  # near-ties, counted; more would be a halo or padding bug hidden by the tolerance


def test_halo_matters(corpus):
    """Without the halo the window edges see a record end that is not there: codes differ (the test
    above would catch a halo bug)."""
    model, index, tokens = corpus
    fly = GenomeWindows(index, 62, halo=0)
    encode = OnTheFlyEncoder(model)
    j = int(np.flatnonzero(fly.index[:, 1] == 62)[0])  # a window inside a long record
    assert not np.array_equal(encode([fly[j]])[0].numpy(), CodeWindows(tokens, 62)[j].numpy())


def test_same_seed_same_windows(corpus):
    """The Trainer's sampler (RandomSampler seeded by the run's seed) over either dataset draws the same
    code windows, and the collators build the same batch from them."""
    model, index, tokens = corpus
    fly, files = GenomeWindows(index, 62, halo=model.receptive_radius), CodeWindows(tokens, 62)
    order = [list(torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(5))) for ds in (fly, files)]
    assert order[0] == order[1]
    sizes = model.config.codebook_sizes
    from vqdna.train.pretrain import MLMCollator

    js = order[0][:8]
    torch.manual_seed(3)
    a = OnTheFlyMLMCollator(model, sizes)([fly[j] for j in js])
    torch.manual_seed(3)
    b = MLMCollator(sizes)([files[j] for j in js])
    for key in a:
        assert torch.equal(a[key], b[key]), key
