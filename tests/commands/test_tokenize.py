"""`vqdna tokenize` (vqdna/commands/tokenize.py): the summary it prints, one clear error line (exit code,
no traceback, no --out left behind) for malformed input, damaged tokenizers, zero counts, a full disk,
missing CUDA and Ctrl-C, and a run killed at any moment resumes to the bytes of a clean run."""

import contextlib
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from tests.streaming._fixtures import KW, LENGTHS, ONE_THREAD_ENV, clean, dir_bytes, model, model_dir, one_thread, random_fasta, tiny_model  # noqa: F401 (fixtures)
from tests.models.test_tokenizer_model import CHECKPOINT_DAMAGES, damage_checkpoint
from vqdna import cli
from vqdna.data import TokenDataset
from vqdna.streaming import TokenizeError, tokenize_files


def _cli(capsys, *argv):
    code = cli.main(["tokenize", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_smoke(tmp_path, model_dir, capsys):
    fasta = random_fasta(tmp_path / "in.fa")
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
    good = random_fasta(tmp_path / "good.fa")
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
    fasta = random_fasta(tmp_path / "in.fa")
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


def _kill_when(args, out, ready):
    """Start `vqdna tokenize`, kill -9 it as soon as ready(listing of out) holds; True if it was
    still running then (killed mid-run), False if it had already finished."""
    proc = subprocess.Popen(args + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV)
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
    fasta = random_fasta(tmp_path / "in.fa", lengths=[3000] * 60)
    args = [sys.executable, "-m", "vqdna.cli", "tokenize", fasta, "--model", model_dir, "--window", "200",
            "--shard-bases", "4000", "--batch-size", "8", "--no-progress"]
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, capture_output=True, env=ONE_THREAD_ENV)
    want = dir_bytes(tmp_path / "ref")
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
        subprocess.run(args + ["--out", out, "--resume"], check=True, capture_output=True, env=ONE_THREAD_ENV)
        assert dir_bytes(out) == want, label
    assert killed >= 3, "the runs finished before they could be killed; make the input larger"


# Item 7 of the probe: every one an error message, not a traceback, and no --out left behind when the
# problem can be seen first.

def _one_line_error(code, err, *needles, want_code=1):
    lines = err.strip().splitlines()
    assert code == want_code and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGES)
def test_cli_damaged_tokenizer_names_the_file(tmp_path, model_dir, capsys, damage):
    fasta = random_fasta(tmp_path / "in.fa")
    shutil.copytree(model_dir, tmp_path / "tok")
    _, text = damage_checkpoint(tmp_path / "tok", damage)
    code, _, err = _cli(capsys, fasta, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "tok"))
    _one_line_error(code, err, "cannot load the tokenizer", text)
    assert "do not match" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--shard-bases", "--batch-size", "--window"])
def test_cli_zero_counts_are_errors(tmp_path, model_dir, capsys, option):
    """--shard-bases 0 was a traceback after creating --out; --batch-size 0 silently became 8."""
    fasta = random_fasta(tmp_path / "in.fa")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenize", fasta, "--out", str(tmp_path / "out"), "--model", model_dir, option, "0"])
    assert exit_info.value.code == 2 and f"{option}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    name = option[2:].replace("-", "_")
    with pytest.raises(TokenizeError, match=f"{name.replace('_', ' ')} must be an integer >= 1, got 0"):
        tokenize_files([fasta], str(tmp_path / "out"), tiny_model(), **{name: 0})
    assert not (tmp_path / "out").exists()


def test_cli_cuda_without_cuda(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fasta = random_fasta(tmp_path / "in.fa")
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
    assert dir_bytes(out) == dir_bytes(want)


def test_cli_disk_full_on_the_manifest(tmp_path, model_dir, capsys, monkeypatch):
    """Disk full before the manifest was written said "output:" and left a 0-byte manifest.json.tmp."""
    fasta = random_fasta(tmp_path / "in.fa")
    out = tmp_path / "out"
    with _disk_full_for(monkeypatch, "manifest.json.tmp"):
        code, _, err = _cli(capsys, fasta, "--out", str(out), "--model", model_dir)
    _one_line_error(code, err, f"{out / 'manifest.json.tmp'}: No space left on device")
    assert "manifest.json.tmp" not in os.listdir(out)


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
    assert dir_bytes(out) == dir_bytes(want)
