"""Streaming tokenization (vqdna.streaming, `vqdna tokenize`): streaming equals whole-record encoding,
resume after a crash is byte-identical, two ranks equal one, malformed input and changed inputs give
one clear error, disk errors are reported. A tiny random tokenizer keeps it fast."""

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from tests.models.test_tokenizer_model import CHECKPOINT_DAMAGES, damage_checkpoint
from tests.tolerances import TOL
from vqdna import cli
from vqdna.data import TokenDataset, TokenFileError
from vqdna.kernels import reference
from vqdna.streaming import TokenizeError, tokenize_files, work_units
from vqdna.streaming.settings import DEFAULT_SHARD_RECORDS
from tests.streaming.test_units import linked

# Record lengths around every boundary that matters: empty, shorter than the halo, one window,
# window +- 1, several windows, longer than a shard.
LENGTHS = [0, 1, 5, 9, 63, 64, 65, 200, 0, 1301, 3]


def _tiny_model(seed: int = 0):
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
    return _tiny_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("tokenizer")
    model.save_pretrained(str(path))
    return str(path)


def _random_fasta(path, lengths=LENGTHS, seed=0, gz=False):
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


def _dir_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def _check_near_ties(model, ids, got, want, tol=TOL[torch.float32]):
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


@pytest.mark.parametrize("window", [7, 64, 500])  # 7: shorter than the halo (8)
def test_streaming_equals_whole_record(tmp_path, model, window):
    fasta = _random_fasta(tmp_path / "in.fa", seed=window)
    out = tmp_path / "out"
    stats = tokenize_files([fasta], str(out), model, window=window, batch_size=16, shard_bases=700)
    ds = TokenDataset(out)
    assert len(ds) == len(LENGTHS) == stats.records == stats.total_records
    assert stats.bases == sum(LENGTHS) and len(ds.manifest["shards"]) == stats.shards_written == -(-sum(LENGTHS) // 700)
    from vqdna.data import read_fasta

    differing = 0
    for i, rec in enumerate(read_fasta(fasta)):
        name, codes = ds[i]
        assert name == rec.name and codes.shape == (len(rec.ids), 2)
        if len(rec.ids) == 0:
            continue
        want = model.encode(torch.from_numpy(rec.ids)[None].long())[0].numpy()
        differing += _check_near_ties(model, rec.ids, codes.astype(np.int64), want.astype(np.int64))
    assert differing <= 3  # near-ties are rare; many would mean a halo bug hidden by the tolerance
    assert sum(int(u.sum()) for u in stats.usage) == 2 * sum(LENGTHS)


def _mismatches(model, fasta, out):
    """Positions whose codes in token directory `out` differ from encoding their record alone (int)."""
    from vqdna.data import read_fasta

    ds, bad = TokenDataset(out), 0
    for i, rec in enumerate(read_fasta(fasta)):
        want = model.encode(torch.from_numpy(rec.ids)[None].long())[0].numpy()
        bad += int((ds[i][1].astype(np.int64) != want).any(-1).sum())
    return bad


def test_short_records_are_packed_isolation_gap_apart(tmp_path, model, monkeypatch):
    """Short records share rows isolation_gap (3) pad positions apart, not halo (8) apart, and are still
    coded as each alone; with one pad position less they are not (so this test catches a gap too small)."""
    from vqdna.streaming import pipeline

    gaps = []
    real_batches = pipeline.batches
    monkeypatch.setattr(pipeline, "batches", lambda *a, **k: gaps.append(a[4]) or real_batches(*a, **k))
    fasta = _random_fasta(tmp_path / "in.fa", [1, 2, 3, 5, 8, 13, 4, 7, 2, 30] * 12, seed=5)
    tokenize_files([fasta], str(tmp_path / "out"), model, window=64, batch_size=2)
    assert set(gaps) == {model.isolation_gap} == {3} and model.receptive_radius == 8
    assert _mismatches(model, fasta, tmp_path / "out") <= 3  # near-ties at most (test above)
    monkeypatch.setattr(type(model), "isolation_gap", property(lambda self: 2))
    tokenize_files([fasta], str(tmp_path / "small"), model, window=64, batch_size=2)
    assert _mismatches(model, fasta, tmp_path / "small") > 50


def _repeats_fasta(path, seed=0):
    """400 records drawn from a small pool (most repeat, some runs of the same record in a row):
    lengths 1..8, 38 and 39 (the short/long threshold at window 64: short_limit(64, 8, 3) = 38), one
    over a window, empty; N and IUPAC letters; plus a few distinct records."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGTACGTNacgtRY", np.uint8)
    pool = [letters[rng.integers(0, len(letters), n)].tobytes().decode() for n in (1, 2, 2, 5, 8, 8, 37, 38, 38, 39, 39, 90, 0)]
    seqs = [pool[int(i)] for i in rng.integers(0, len(pool), 380)] + [pool[6]] * 20
    seqs = [seqs[i] for i in rng.permutation(len(seqs))] + ["ACGTNACGT"[: 1 + i % 9] + "T" * i for i in range(12)]
    path.write_text("".join(f">r{i} copy\n{s}\n" for i, s in enumerate(seqs)))
    return str(path), seqs


@pytest.mark.parametrize("shard_records", [37, 1000])  # 37: unit boundaries fall inside runs of repeats
def test_repeated_short_records_are_coded_once_per_unit(tmp_path, model, monkeypatch, shard_records):
    """Repeats of a short record in a work unit are coded once and copied: the directory is byte for byte
    the one coding every record, with fewer bases through the encoder."""
    from vqdna.streaming import packing

    fasta, seqs = _repeats_fasta(tmp_path / "in.fa")
    bases = sum(map(len, seqs))
    kw = dict(window=64, batch_size=3, shard_records=shard_records)
    stats = tokenize_files([fasta], str(tmp_path / "derep"), model, **kw)
    monkeypatch.setattr(packing, "dereplication", lambda unit, limit: None)
    every = tokenize_files([fasta], str(tmp_path / "every"), model, **kw)
    assert _dir_bytes(tmp_path / "derep") == _dir_bytes(tmp_path / "every")
    assert stats.bases == every.bases == every.encoded_bases == bases and stats.records == len(seqs)
    short = [s.upper().replace("R", "N").replace("Y", "N") for s in seqs if 1 <= len(s) <= 38]
    repeats = len(short) - len(set(short))  # copies in one unit (every letter but ACGT reads as N)
    assert every.copied_records == 0  # the dereplicated path ran, and all of it in one unit:
    assert stats.copied_records == repeats if stats.shards_written == 1 else repeats / 2 < stats.copied_records < repeats
    assert stats.encoded_bases < 0.7 * bases and stats.encoded_positions < 0.7 * every.encoded_positions
    assert _mismatches(model, fasta, tmp_path / "derep") <= 3  # near-ties at most (as coding each alone)


def test_work_units_are_deterministic(tmp_path):
    fasta = _random_fasta(tmp_path / "in.fa")
    units = list(work_units([fasta], 100, 4))
    again = list(work_units([fasta], 100, 4))
    assert [u.pieces for u in units] == [u.pieces for u in again]
    # A byte range of shard_bases bytes holds at most one base more (a record's first base stays with
    # its header); pieces tile every record exactly once, in input order.
    assert all(u.bases <= 101 for u in units)
    covered = {}
    for pieces in linked(units)[0]:
        for ordinal, _, start, length, _ in pieces:
            assert covered.get(ordinal, 0) == start
            covered[ordinal] = start + length
    assert [covered[i] for i in range(len(LENGTHS))] == LENGTHS


def test_resume_after_failure_is_byte_identical(tmp_path, model, monkeypatch):
    fasta = _random_fasta(tmp_path / "in.fa.gz", gz=True)
    kw = dict(window=50, batch_size=4, shard_bases=300)
    tokenize_files([fasta], str(tmp_path / "a"), model, **kw)
    # Crash while writing the 3rd shard: two shards complete, the third left as a temporary file.
    from vqdna.streaming import token_files as tokens

    real_close, closed = tokens.ShardWriter.close, []

    def failing_close(self):
        if len(closed) == 2:
            self._file.write(b"partial garbage")
            raise OSError(28, "No space left on device (injected)", self.bin_path)
        closed.append(self.name)
        real_close(self)

    monkeypatch.setattr(tokens.ShardWriter, "close", failing_close)
    with pytest.raises(OSError, match="injected"):
        tokenize_files([fasta], str(tmp_path / "b"), model, **kw)
    monkeypatch.setattr(tokens.ShardWriter, "close", real_close)
    left = sorted(os.listdir(tmp_path / "b"))
    assert "shard-00002.bin.tmp" in left and "shard-00002.idx" not in left
    with pytest.raises(Exception, match="incomplete"):
        TokenDataset(tmp_path / "b")
    with pytest.raises(TokenizeError, match="--resume"):
        tokenize_files([fasta], str(tmp_path / "b"), model, **kw)
    stats = tokenize_files([fasta], str(tmp_path / "b"), model, resume=True, **kw)
    assert stats.shards_skipped == 2 and stats.shards_written == len(TokenDataset(tmp_path / "a").manifest["shards"]) - 2
    assert _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b")
    # Resuming a complete directory does nothing and changes nothing.
    stats = tokenize_files([fasta], str(tmp_path / "b"), model, resume=True, **kw)
    assert stats.shards_written == 0 and _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b")


def test_changed_input_or_tokenizer_is_refused(tmp_path, model):
    fasta = _random_fasta(tmp_path / "in.fa")
    out = str(tmp_path / "out")
    tokenize_files([fasta], out, model, window=100, shard_bases=500)
    with pytest.raises(TokenizeError, match="tokenizer changed"):
        tokenize_files([fasta], out, _tiny_model(seed=1), window=100, shard_bases=500, resume=True)
    with pytest.raises(TokenizeError, match="window was 100 and is now 90"):
        tokenize_files([fasta], out, model, window=90, shard_bases=500, resume=True)
    _random_fasta(tmp_path / "in.fa", seed=5)  # same lengths, other bases
    with pytest.raises(TokenizeError, match=r"in\.fa changed since the manifest"):
        tokenize_files([fasta], out, model, window=100, shard_bases=500, resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(TokenizeError, match="not a vqdna token directory"):
        tokenize_files([fasta], str(tmp_path / "junk"), model)


def _rank_main(rank, world, init_file, inputs, out, model_dir):
    import torch.distributed as dist

    from vqdna.models import VQDNATokenizerModel
    from vqdna.streaming import run as run_mod, units as units_mod

    # Count what this rank plans and which units it reads (the ranks are forked: patch here).
    seen = {"plans": 0, "units": []}
    real_plan, real_unit = units_mod.plan_units, units_mod._byte_unit

    def plan(*args, **kw):
        seen["plans"] += 1
        return real_plan(*args, **kw)

    def unit(*args):
        seen["units"].append(args[-1])
        return real_unit(*args)

    run_mod.plan_units, units_mod._byte_unit = plan, unit
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = VQDNATokenizerModel.from_pretrained(model_dir)
        tokenize_files(inputs, out, model, window=40, batch_size=4, shard_bases=250)
    finally:
        dist.destroy_process_group()
    with open(f"{init_file}.rank{rank}.json", "w") as f:
        json.dump(seen, f)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one(tmp_path, model_dir, world):
    """2 or 3 gloo ranks write the same bytes as one process (a plain and a gzip input); only rank 0
    plans (the plain file from its size and first MiB), and each rank reads only its own units of
    the plain file (issue 22: planning is not O(bases) per rank)."""
    from vqdna.models import VQDNATokenizerModel
    from vqdna.streaming.units import plan_units

    inputs = [_random_fasta(tmp_path / "in.fa"), _random_fasta(tmp_path / "in2.fa.gz", LENGTHS[::-1], seed=1, gz=True)]
    one = str(tmp_path / "one")
    tokenize_files(inputs, one, VQDNATokenizerModel.from_pretrained(model_dir), window=40, batch_size=4, shard_bases=250)
    many = str(tmp_path / "many")
    # fork: the ranks inherit the imported modules (spawn would re-import torch and transformers in
    # each); they run single-threaded, so no OpenMP pool is used across the fork.
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, str(tmp_path / "init"), inputs, many, model_dir), nprocs=world, join=True, start_method="fork"
    )
    assert len(TokenDataset(one).manifest["shards"]) >= 8
    assert _dir_bytes(one) == _dir_bytes(many)
    seen = [json.loads((tmp_path / f"init.rank{r}.json").read_text()) for r in range(world)]
    assert [s["plans"] for s in seen] == [1] + [0] * (world - 1)
    plain = plan_units(inputs, 250, DEFAULT_SHARD_RECORDS).files[0].units
    assert [s["units"] for s in seen] == [list(range(r, plain, world)) for r in range(world)]


# --- the CLI ---------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    code = cli.main(["tokenize", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_smoke(tmp_path, model_dir, capsys):
    fasta = _random_fasta(tmp_path / "in.fa")
    out = str(tmp_path / "out")
    code, stdout, err = _cli(capsys, fasta, "--out", out, "--model", model_dir, "--window", "100", "--device", "cpu")
    assert code == 0, err
    assert f"records  {len(LENGTHS)} in the output" in stdout and f"bases    {sum(LENGTHS):,}" in stdout
    assert "M bases/s" in stdout and "reading" in stdout and "level 1" in stdout and "codes used" in stdout
    ds = TokenDataset(out)
    weights = open(os.path.join(model_dir, "model.safetensors"), "rb").read()
    assert ds.manifest["tokenizer"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert ds.lengths.tolist() == LENGTHS
    code, _, err = _cli(capsys, fasta, "--out", out, "--model", model_dir, "--window", "100", "--device", "cpu")
    assert code == 1 and "--resume" in err


MALFORMED = {
    "bad_byte.fa": (b">a\nACGT\nAC!T\n", "line 3"),
    "before_header.fa": (b"ACGT\n>a\nACGT\n", "line 1"),
    "junk.fa": (bytes(range(1, 200)), "line"),
}


@pytest.mark.parametrize("name", [*MALFORMED, "truncated.fa.gz"])
def test_cli_malformed_input(tmp_path, model_dir, capsys, name):
    path = tmp_path / name
    if name == "truncated.fa.gz":
        data = gzip.compress((">a\n" + "ACGT" * 5000 + "\n").encode())
        path.write_bytes(data[: len(data) // 2])
        where = "truncated"
    else:
        path.write_bytes(MALFORMED[name][0])
        where = MALFORMED[name][1]
    good = _random_fasta(tmp_path / "good.fa")
    out = str(tmp_path / "out")
    code, _, err = _cli(capsys, good, str(path), "--out", out, "--model", model_dir, "--shard-bases", "500")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and where in lines[0], lines[0]
    with pytest.raises(Exception, match="incomplete"):
        TokenDataset(out)


def test_cli_legal_oddities(tmp_path, model_dir, capsys):
    """CRLF, lowercase, IUPAC, U, blank lines and empty records tokenize like their clean form."""
    odd = tmp_path / "odd.fa"
    odd.write_bytes(b">x one\r\nacgu\r\n\r\nNRYk\r\n>empty\r\n>y\r\nGGGA\r\n")
    clean = tmp_path / "clean.fa"
    clean.write_bytes(b">x one\nACGTNNNN\n>empty\n>y\nGGGA\n")
    for src in (odd, clean):
        code, _, err = _cli(capsys, str(src), "--out", str(tmp_path / src.stem), "--model", model_dir)
        assert code == 0, err
    a, b = TokenDataset(tmp_path / "odd"), TokenDataset(tmp_path / "clean")
    assert [a[i][0] for i in range(3)] == ["x", "empty", "y"] and a.lengths.tolist() == [8, 0, 4]
    for i in range(3):
        np.testing.assert_array_equal(a[i][1], b[i][1])


@contextlib.contextmanager
def _disk_full_for(monkeypatch, name):
    """Writes to the temporary file `name` fail with ENOSPC: the file is created as usual (so a leftover
    would show), then its descriptor is swapped for /dev/full's."""
    from vqdna.streaming import token_files as tokens

    real = tokens.create_new

    def create_new(path, text=False):
        f = real(path, text)
        if os.path.basename(path) != name:
            return f
        f.close()
        return open("/dev/full", "w" if text else "wb")

    with monkeypatch.context() as m:
        m.setattr(tokens, "create_new", create_new)
        yield


def test_cli_disk_full_permissions_missing_input(tmp_path, model_dir, capsys, monkeypatch):
    fasta = _random_fasta(tmp_path / "in.fa")
    out = tmp_path / "out"
    with _disk_full_for(monkeypatch, "shard-00000.bin.tmp"):  # every write to the first shard fails
        code, _, err = _cli(capsys, fasta, "--out", str(out), "--model", model_dir)
    assert code == 1 and "shard-00000.bin.tmp: No space left on device" in err and "Traceback" not in err, err
    (tmp_path / "a-file").write_text("")
    code, _, err = _cli(capsys, fasta, "--out", str(tmp_path / "a-file" / "out"), "--model", model_dir)
    assert code == 1 and "a-file/out: Not a directory" in err and "Traceback" not in err, err
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = _cli(capsys, fasta, "--out", str(locked / "out"), "--model", model_dir)
        assert code == 1 and "Permission denied" in err, err
    code, _, err = _cli(capsys, str(tmp_path / "nope.fa"), "--out", str(tmp_path / "o2"), "--model", model_dir)
    assert code == 1 and "nope.fa: no such input file" in err
    code, _, err = _cli(capsys, fasta, "--out", str(tmp_path / "o3"), "--model", str(tmp_path / "no-model"))
    assert code == 1 and "cannot load the tokenizer" in err


_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tiny model's ops are too small for two


def _kill_when(args, out, ready):
    """Start `vqdna tokenize`, kill -9 it as soon as ready(listing of out) holds; True if it was
    still running then (killed mid-run), False if it had already finished."""
    proc = subprocess.Popen(args + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ONE_THREAD)
    while proc.poll() is None:
        if os.path.isdir(out) and ready(sorted(os.listdir(out))):
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_kill_at_any_moment_then_resume(tmp_path, model_dir):
    """kill -9 a real `vqdna tokenize` process at several moments (while the first shard is written,
    right after a shard completed, between a .bin and its .idx...); --resume gives the same bytes."""
    fasta = _random_fasta(tmp_path / "in.fa", lengths=[3000] * 60)
    args = [sys.executable, "-m", "vqdna.cli", "tokenize", fasta, "--model", model_dir, "--window", "200",
            "--shard-bases", "4000", "--batch-size", "8", "--no-progress"]
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True, env=_ONE_THREAD)
    want = _dir_bytes(tmp_path / "ref")
    moments = {
        "first-shard-open": lambda names: "shard-00000.bin.tmp" in names,
        "one-shard-done": lambda names: "shard-00000.idx" in names,
        "bin-renamed": lambda names: any(n.endswith(".bin") and n[:-4] + ".idx" not in names for n in names),
        "many-done": lambda names: "shard-00020.idx" in names,
    }
    killed = 0
    for label, ready in moments.items():
        out = str(tmp_path / label)
        killed += _kill_when(args, out, ready)
        subprocess.run(args + ["--out", out, "--resume"], check=True, capture_output=True, env=_ONE_THREAD)
        assert _dir_bytes(out) == want, label
    assert killed >= 3, "the runs finished before they could be killed; make the input larger"


def test_demo_tokenizes_the_bundled_genome(model_dir, capsys):
    """`vqdna demo` (tokenization part) on the bundled lambda genome with a given tokenizer."""
    assert cli.main(["demo", "--model", model_dir, "--skip-backends"]) == 0
    out = capsys.readouterr().out
    assert "tokenized" in out and "lambda.fa.gz" in out and "bases    48,502 in the output" in out and "level 1" in out


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tmp_path, model_dir):
    """`torchrun --nproc_per_node 2 -m vqdna.cli tokenize` (gloo on CPU) writes the same bytes as one process."""
    fasta = _random_fasta(tmp_path / "in.fa")
    args = ["-m", "vqdna.cli", "tokenize", fasta, "--model", model_dir, "--window", "40", "--shard-bases", "250",
            "--device", "cpu", "--no-progress"]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=_ONE_THREAD)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=_ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("vqdna tokenize: ") == 1  # only rank 0 prints the summary
    assert _dir_bytes(tmp_path / "one") == _dir_bytes(tmp_path / "two")


def test_fastq_input_equals_fasta(tmp_path, model):
    """FASTQ reads (read_fasta takes both) tokenize like the same sequences given as FASTA."""
    (tmp_path / "r.fq").write_text("@a x\nACGTTGCA\n+\nIIIIIIII\n@b\nGGGAAN\n+\nIIIIII\n")
    (tmp_path / "r.fa").write_text(">a x\nACGTTGCA\n>b\nGGGAAN\n")
    for name in ("r.fq", "r.fa"):
        tokenize_files([str(tmp_path / name)], str(tmp_path / f"out-{name}"), model, window=4)
    a, b = TokenDataset(tmp_path / "out-r.fq"), TokenDataset(tmp_path / "out-r.fa")
    assert len(a) == len(b) == 2
    for i in range(2):
        assert a[i][0] == b[i][0]
        np.testing.assert_array_equal(a[i][1], b[i][1])


# --- trustworthy token files: one writer, only our files, integrity, identity, clean errors ----------

KW = dict(window=50, batch_size=4, shard_bases=300)  # LENGTHS: 7 shards (300-byte ranges), several batches each


@pytest.fixture(scope="module")
def clean(tmp_path_factory, model):
    """(input, a clean run's output directory) for the checks below to compare with."""
    tmp = tmp_path_factory.mktemp("clean")
    fasta = _random_fasta(tmp / "in.fa")
    tokenize_files([fasta], str(tmp / "out"), model, **KW)
    return fasta, str(tmp / "out")


def test_concurrent_resume_is_refused(tmp_path, model, model_dir, clean, capsys, monkeypatch):
    """A --resume started while another run writes the directory used to truncate that run's open
    shard (a hole of zeros under "complete": true). Now it exits at once naming the directory and the
    holder's pid, and the first run's output is byte-identical to a clean run."""
    from vqdna.streaming import token_files as tokens

    fasta, want = clean
    out = str(tmp_path / "out")
    started, release = threading.Event(), threading.Event()
    real_write = tokens.ShardWriter.write

    def paused_write(self, codes):  # the first run stops inside its first shard until released
        if not started.is_set():
            started.set()
            release.wait(60)
        real_write(self, codes)

    monkeypatch.setattr(tokens.ShardWriter, "write", paused_write)
    first = threading.Thread(target=tokenize_files, args=([fasta], out, model), kwargs=KW)
    first.start()
    try:
        assert started.wait(60)
        code, _, err = _cli(capsys, fasta, "--out", out, "--model", model_dir, "--resume", "--device", "cpu",
                            "--window", "50", "--batch-size", "4", "--shard-bases", "300")
        assert code == 1 and out in err and f"pid {os.getpid()}" in err and "Traceback" not in err, err
    finally:
        release.set()
        first.join()
    assert _dir_bytes(out) == _dir_bytes(want)


@pytest.mark.parametrize("entry", ["shard-notes.txt", "shard-old/", "shard-99999.bin", "shard-00000.bin.tmp@"])
def test_foreign_entries_are_refused_before_compute(tmp_path, model, monkeypatch, entry):
    """A directory holding files named shard-* (notes, a directory, a shard without a manifest, a
    symlinked temporary file) used to be accepted and its shard-* entries deleted at the end (or, for
    a directory, to fail after all the compute). Now it is refused first, and nothing is touched."""
    fasta = _random_fasta(tmp_path / "in.fa")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    name = entry.rstrip("/@")
    if entry.endswith("/"):
        (out / name).mkdir()
    elif entry.endswith("@"):
        os.symlink(victim, out / name)
    else:
        (out / name).write_text("mine")
    (out / "shard-plan.md").write_text("mine too") if entry == "shard-notes.txt" else None
    before = sorted(os.listdir(out))

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before refusing the directory")

    monkeypatch.setattr(model, "encode", no_compute)
    with pytest.raises(TokenizeError, match=re.escape(name)):
        tokenize_files([fasta], str(out), model, **KW)
    assert sorted(os.listdir(out)) == before and victim.read_text() == "keep me"


def test_shards_without_manifest_are_never_reused(tmp_path, model, clean):
    """Deleting manifest.json then --resume with other inputs used to keep the old shards (judged by
    size only) under a manifest of the new inputs. Now they are refused, named, and left alone."""
    fasta, want = clean
    out = str(tmp_path / "out")
    shutil.copytree(want, out)
    os.remove(os.path.join(out, "manifest.json"))
    other = _random_fasta(tmp_path / "other.fa", seed=7)
    before = _dir_bytes(out)
    with pytest.raises(TokenizeError, match="shard-00000.bin.*no manifest.json.*never reused"):
        tokenize_files([other], out, model, resume=True, **KW)
    assert _dir_bytes(out) == before


@pytest.mark.parametrize("how", ["truncated-bin", "idx-pointer", "idx-size", "bin-bit", "missing", "incomplete-dir"])
def test_resume_redoes_damaged_shards(tmp_path, model, clean, how):
    """--resume on a complete directory used to return at once ("already complete") whatever the
    shards held. Now every shard's size and index are re-checked (checksums with verify=True: a
    flipped .bin bit keeps the sizes right), a damaged shard is re-done, and the result is
    byte-identical to a clean run."""
    from tests.data.test_tokens import _damage
    from vqdna.streaming.token_files import read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    if how == "incomplete-dir":  # a killed run's directory, then a shard damaged: re-checked as it goes
        write_manifest(str(out), {k: v for k, v in read_manifest(str(out)).items() if k not in ("shards", "records", "bases")} | {"complete": False})
        name = _damage(out, "truncated-bin")
    else:
        name = _damage(out, how)
    stats = tokenize_files([fasta], str(out), model, resume=True, **({"verify": True} if how == "bin-bit" else {}), **KW)
    assert _dir_bytes(out) == _dir_bytes(want)
    assert stats.shards_written == 1 and len(stats.redone) == 1 and name in stats.redone[0], stats.redone


def test_changed_config_with_same_weights_is_refused(tmp_path, clean):
    """The tokenizer's identity used to hash the weights only: a config.json edited to other taps (same
    weights, other codes) was accepted on resume, mixing two tokenizers under one manifest."""
    from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel

    fasta, _ = clean
    torch.manual_seed(0)
    config = VQDNATokenizerConfig(dim=16, depth=3, taps=(1, 3), codebook_sizes=(16, 40), layer_scale_init=1.0)
    VQDNATokenizerModel(config).save_pretrained(tmp_path / "tok")
    out = str(tmp_path / "out")
    tokenize_files([fasta], out, VQDNATokenizerModel.from_pretrained(tmp_path / "tok"), **KW)
    edited = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**edited, "taps": [2, 3]}))
    other = VQDNATokenizerModel.from_pretrained(tmp_path / "tok")  # the same weights file
    before = _dir_bytes(out)
    assert other.tokenizer_sha256 == json.loads(before["manifest.json"])["tokenizer"]["sha256"]
    with pytest.raises(TokenizeError, match=r"config's taps was \[1, 3\] and is now \[2, 3\]"):
        tokenize_files([fasta], out, other, resume=True, **KW)
    assert _dir_bytes(out) == before


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_path_names_are_refused_on_resume(tmp_path, model, clean, where):
    from vqdna.streaming.token_files import TokenFileError, read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    manifest = read_manifest(str(out))
    manifest["shards"][0]["name"] = "../victim/shard-00000" if where == "parent" else str(tmp_path / "victim" / "shard-00000")
    write_manifest(str(out), manifest)
    with pytest.raises(TokenFileError, match="shard 0 is named"):
        tokenize_files([fasta], str(out), model, resume=True, **KW)


def test_symlinked_tmp_is_never_followed(tmp_path, model, clean):
    """A symlink named shard-00000.bin.tmp planted in a killed run's directory used to be followed and
    its target overwritten. Now the directory is refused (and a symlink planted later makes the
    O_EXCL|O_NOFOLLOW open fail): the target is untouched."""
    from vqdna.streaming.token_files import read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    write_manifest(str(out), {**read_manifest(str(out)), "complete": False})
    os.remove(out / "shard-00000.bin")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, out / "shard-00000.bin.tmp")
    with pytest.raises(TokenizeError, match="shard-00000.bin.tmp', a symbolic link"):
        tokenize_files([fasta], str(out), model, resume=True, **KW)
    assert victim.read_text() == "keep me"
    from vqdna.data.integrity import create_new

    with pytest.raises(FileExistsError):
        create_new(str(out / "shard-00000.bin.tmp"))
    assert victim.read_text() == "keep me"


# Item 7 of the probe: every one an error message, not a traceback, and no --out left behind when the
# problem can be seen first.

def _one_line_error(code, err, *needles, want_code=1):
    lines = err.strip().splitlines()
    assert code == want_code and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGES)
def test_cli_damaged_tokenizer_names_the_file(tmp_path, model_dir, capsys, damage):
    fasta = _random_fasta(tmp_path / "in.fa")
    shutil.copytree(model_dir, tmp_path / "tok")
    _, text = damage_checkpoint(tmp_path / "tok", damage)
    code, _, err = _cli(capsys, fasta, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "tok"))
    _one_line_error(code, err, "cannot load the tokenizer", text)
    assert "do not match" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--shard-bases", "--batch-size", "--window"])
def test_cli_zero_counts_are_errors(tmp_path, model_dir, capsys, option):
    """--shard-bases 0 was a traceback after creating --out; --batch-size 0 silently became 8."""
    fasta = _random_fasta(tmp_path / "in.fa")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenize", fasta, "--out", str(tmp_path / "out"), "--model", model_dir, option, "0"])
    assert exit_info.value.code == 2 and f"{option}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    name = option[2:].replace("-", "_")
    with pytest.raises(TokenizeError, match=f"{name.replace('_', ' ')} must be an integer >= 1, got 0"):
        tokenize_files([fasta], str(tmp_path / "out"), _tiny_model(), **{name: 0})
    assert not (tmp_path / "out").exists()


def test_cli_cuda_without_cuda(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fasta = _random_fasta(tmp_path / "in.fa")
    code, _, err = _cli(capsys, fasta, "--out", str(tmp_path / "out"), "--model", model_dir, "--device", "cuda")
    _one_line_error(code, err, "device 'cuda'", "use --device cpu")
    assert not (tmp_path / "out").exists()


def test_cli_ctrl_c_exits_130_and_resumes(tmp_path, model_dir, clean, capsys, monkeypatch):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line, exit 130, and --resume finishes the
    directory byte-identical to a clean run."""
    from vqdna.streaming import pipeline as tok

    fasta, want = clean
    out = str(tmp_path / "out")
    real, calls = tok.Pipeline.compute, []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 12:  # a few shards in
            raise KeyboardInterrupt
        real(self, batch)

    monkeypatch.setattr(tok.Pipeline, "compute", interrupted)
    args = [fasta, "--out", out, "--model", model_dir, "--device", "cpu", "--window", "50", "--batch-size", "4", "--shard-bases", "300"]
    code, _, err = _cli(capsys, *args)
    _one_line_error(code, err, "interrupted", out, "--resume", want_code=130)
    monkeypatch.setattr(tok.Pipeline, "compute", real)
    assert "shard-00000.idx" in os.listdir(out) and open(os.path.join(out, "tokenize.lock")).read() == ""
    code, _, err = _cli(capsys, *args, "--resume")
    assert code == 0, err
    assert _dir_bytes(out) == _dir_bytes(want)


def test_cli_disk_full_on_the_manifest(tmp_path, model_dir, capsys, monkeypatch):
    """Disk full before the manifest was written said "output:" and left a 0-byte manifest.json.tmp."""
    fasta = _random_fasta(tmp_path / "in.fa")
    out = tmp_path / "out"
    with _disk_full_for(monkeypatch, "manifest.json.tmp"):
        code, _, err = _cli(capsys, fasta, "--out", str(out), "--model", model_dir)
    _one_line_error(code, err, f"{out / 'manifest.json.tmp'}: No space left on device")
    assert "manifest.json.tmp" not in os.listdir(out)


def test_cli_verify(tmp_path, clean, capsys):
    """`vqdna verify DIR`: exit 0 on a whole directory; 1 with one line per damaged shard."""
    from tests.data.test_tokens import _damage

    _, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    assert cli.main(["verify", str(out)]) == 0
    assert "7 shards, every size and checksum matches" in capsys.readouterr().out
    _damage(out, "bin-bit")
    os.remove(out / "shard-00003.idx")
    assert cli.main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "shard-00001.bin: checksum mismatch" in err[0] and "shard-00003.idx: missing" in err[1], err
    assert err[2].endswith("2 problem(s)")


def test_fastq_short_quality_does_not_swallow_the_next_record(tmp_path, model):
    """A quality line shorter than its sequence took the next record as the rest of its quality
    (exit 0, one record instead of two). Now an error names the file, record and line."""
    from vqdna.data import FastaFormatError

    path = tmp_path / "r.fq"
    path.write_text("@a\nACGTACGT\n+\nI\n@b\nGG\n+\nII\n")
    with pytest.raises(FastaFormatError, match=f"{re.escape(str(path))}: record 'a', line 4: quality has 1 characters, the sequence 8 bases"):
        tokenize_files([str(path)], str(tmp_path / "out"), model, window=4)


def test_format_1_directory_is_not_continued(tmp_path, model):
    """Format 1 (no checksums) is read (tests/data/test_tokens.py) but not continued: its shards
    could not be checked like the new ones."""
    out = tmp_path / "tokens-v1"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", "tokens-v1"), out)
    fasta = _random_fasta(tmp_path / "in.fa", lengths=[0, 5, 63, 200, 3])
    with pytest.raises(TokenizeError, match="cannot resume: it was written in format version 1 by an older vqdna"):
        tokenize_files([fasta], str(out), model, resume=True, window=50, batch_size=4, shard_bases=150)


def test_format_4_reads_like_format_3(tmp_path, model):
    """The same input, tokenizer and settings in format 4 (byte-range units, shard-local numbers the
    manifest completes) read back exactly like the format 3 directory main's code wrote
    (tests/data/fixtures/tokens-v3): every record's name, length, codes and `find`; each record's
    pieces tile it (starts and record lengths completed), though the cut differs."""
    from vqdna.streaming.token_files import open_shards

    fixtures = os.path.join(os.path.dirname(__file__), "..", "data", "fixtures")
    v3 = TokenDataset(os.path.join(fixtures, "tokens-v3"), verify=True)
    assert v3.manifest["format_version"] == 3
    inputs = [_random_fasta(tmp_path / "in.fa"), _random_fasta(tmp_path / "in2.fa.gz", LENGTHS[::-1], seed=1, gz=True)]
    out = str(tmp_path / "v4")
    tokenize_files(inputs, out, model, window=50, batch_size=4, shard_bases=300)
    v4 = TokenDataset(out, verify=True)
    assert v4.manifest["format_version"] == 4 and v4.manifest["shards"] != v3.manifest["shards"]
    assert len(v4) == len(v3) == 2 * len(LENGTHS) and v4.lengths.tolist() == v3.lengths.tolist()
    for i in range(len(v3)):
        assert v4.name(i) == v3.name(i) and v4.find(v3.name(i)) == v3.find(v3.name(i)) == i % len(LENGTHS)
        np.testing.assert_array_equal(v4[i][1], v3[i][1])
    covered = {}
    for idx in open_shards(out, v4.manifest):
        for j in range(len(idx)):
            o = int(idx.ordinals[j])
            assert (idx.name(j), int(idx.record_lengths[j]), int(idx.starts[j])) == (v3.name(o), v3.lengths[o], covered.get(o, 0))
            covered[o] = covered.get(o, 0) + idx.length(j)
    assert [covered[i] for i in range(len(v3))] == v3.lengths.tolist()
    assert sum(1 for e in v4.manifest["shards"] if "continued" in e) > 3  # records split across shards
    # The manifest is what completes the shards: one that lost a split record's entry is refused.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    k = next(k for k, e in enumerate(manifest["shards"]) if "continued" in e)
    del manifest["shards"][k]["continued"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenFileError, match=f"shard-{k:05d}.idx: its first piece continues a record of an earlier shard, the manifest says it does not"):
        TokenDataset(str(broken))
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    manifest["shards"][k]["continued"]["start"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TokenFileError, match=f"shard-{k:05d}.idx: its first piece does not go on where its record's previous piece ended"):
        TokenDataset(str(broken))
