"""Shared by the streaming and `vqdna tokenize` tests: a tiny random tokenizer (fast), random FASTA inputs
whose record lengths cross every boundary, a clean run to compare with, byte comparison of token
directories and the near-tie check of codes against whole-record encoding."""

import gzip
import os

import numpy as np
import pytest
import torch

from tests.tolerances import TOL
from vqdna.data import TokenDataset
from vqdna.kernels import reference
from vqdna.streaming import tokenize_files

ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: the tiny model's ops are too small for two

# Record lengths around every boundary that matters: empty, shorter than the halo, one window,
# window +- 1, several windows, longer than a shard.
LENGTHS = [0, 1, 5, 9, 63, 64, 65, 200, 0, 1301, 3]


def tiny_model(seed: int = 0):
    """A tiny random tokenizer (dim 16, 2 blocks, 2 levels) whose blocks matter (layer scale 1) and
    whose codebooks are drawn from its own features, so codes spread over the codebooks."""
    from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel

    torch.manual_seed(seed)
    config = VQDNATokenizerConfig(dim=16, depth=2, taps=(1, 2), codebook_sizes=(16, 40), layer_scale_init=1.0)
    model = VQDNATokenizerModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5, (1, 3000), generator=g)
    with torch.no_grad():
        zs = [z[0] for z in model.encoder(ids)]
        prev = None
        for level, (z, book) in enumerate(zip(zs, model.codebooks)):
            h = z if prev is None else 2 * z - prev
            book.copy_(h[torch.randperm(h.shape[0], generator=g)[: book.shape[0]]])
            codes, _ = reference.lookup(h, book)
            prev = book[codes.long()]
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds of work: one intra-op thread avoids paying thread
    wake-ups on every op (which dominate on a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("tokenizer")
    model.save_pretrained(str(path))
    return str(path)


def random_fasta(path, lengths=LENGTHS, seed=0, gz=False):
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGTACGTACGTNacgtRY", np.uint8)
    lines = []
    for i, n in enumerate(lengths):
        seq = letters[rng.integers(0, len(letters), n)].tobytes().decode()
        lines.append(f">r{i} record {i}")
        lines.extend(seq[j : j + 60] for j in range(0, n, 60))
    data = ("\n".join(lines) + "\n").encode()
    (gzip.open if gz else open)(path, "wb").write(data)
    return str(path)


def dir_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def check_near_ties(model, ids, got, want, tol=TOL[torch.float32]):
    """Codes from streaming (got) may differ from whole-record encoding (want) only at near-ties (distances
    within tol * scale): level l is compared where every earlier level agreed (else H_l differs by construction)."""
    with torch.no_grad():
        zs = [z[0].double() for z in model.encoder(torch.from_numpy(ids)[None].long())]
    books = [b.double() for b in model.codebooks]
    agree = np.ones(len(ids), bool)
    prev = None
    for level, (z, book) in enumerate(zip(zs, books)):
        h = z if prev is None else 2 * z - prev
        rows = np.flatnonzero(agree & (got[:, level] != want[:, level]))
        if rows.size:
            hr = h[rows]
            d_got = ((hr - book[got[rows, level]]) ** 2).sum(-1)
            d_want = ((hr - book[want[rows, level]]) ** 2).sum(-1)
            scale = (hr * hr).sum(-1) + (book * book).sum(-1).max()
            assert ((d_got - d_want).abs() <= 2 * tol * scale).all(), f"level {level}: rows {rows[:5]} differ beyond a near-tie"
        prev = book[torch.from_numpy(want[:, level]).long()]
        agree &= got[:, level] == want[:, level]
    return int((~agree).sum())


def mismatches(model, fasta, out):
    """Positions whose codes in token directory `out` differ from encoding their record alone (int)."""
    from vqdna.data import read_fasta

    ds, bad = TokenDataset(out), 0
    for i, rec in enumerate(read_fasta(fasta)):
        want = model.encode(torch.from_numpy(rec.ids)[None].long())[0].numpy()
        bad += int((ds[i][1].astype(np.int64) != want).any(-1).sum())
    return bad


# --- trustworthy token files: one writer, only our files, integrity, identity, clean errors ----------

KW = dict(window=50, batch_size=4, shard_bases=300)  # LENGTHS: 7 shards (300-byte ranges), several batches each


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model):
    """(input, a clean run's output directory) for the checks below to compare with."""
    tmp = tmp_path_factory.mktemp("clean")
    fasta = random_fasta(tmp / "in.fa")
    tokenize_files([fasta], str(tmp / "out"), model, **KW)
    return fasta, str(tmp / "out")
