"""vqdna.streaming.run (`tokenize_files`): streaming equals whole-record encoding up to near-ties, resume
after a crash is byte-identical, FASTQ input equals FASTA and a malformed one names the file, record and
line. A tiny random tokenizer keeps it fast."""

import os
import re

import numpy as np
import pytest
import torch

from tests.streaming._fixtures import LENGTHS, check_near_ties, dir_bytes, model, one_thread, random_fasta  # noqa: F401 (fixtures)
from vqdna.data import TokenDataset
from vqdna.streaming import TokenizeError, tokenize_files


@pytest.mark.parametrize("window", [7, 64, 500])  # 7: shorter than the halo (8)
def test_streaming_equals_whole_record(tmp_path, model, window):
    fasta = random_fasta(tmp_path / "in.fa", seed=window)
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
        differing += check_near_ties(model, rec.ids, codes.astype(np.int64), want.astype(np.int64))
    assert differing <= 3  # near-ties are rare; many would mean a halo bug hidden by the tolerance
    assert sum(int(u.sum()) for u in stats.usage) == 2 * sum(LENGTHS)


def test_resume_after_failure_is_byte_identical(tmp_path, model, monkeypatch):
    fasta = random_fasta(tmp_path / "in.fa.gz", gz=True)
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
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    # Resuming a complete directory does nothing and changes nothing.
    stats = tokenize_files([fasta], str(tmp_path / "b"), model, resume=True, **kw)
    assert stats.shards_written == 0 and dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")


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


def test_fastq_short_quality_does_not_swallow_the_next_record(tmp_path, model):
    """A quality line shorter than its sequence took the next record as the rest of its quality
    (exit 0, one record instead of two). Now an error names the file, record and line."""
    from vqdna.data import FastaFormatError

    path = tmp_path / "r.fq"
    path.write_text("@a\nACGTACGT\n+\nI\n@b\nGG\n+\nII\n")
    with pytest.raises(FastaFormatError, match=f"{re.escape(str(path))}: record 'a', line 4: quality has 1 characters, the sequence 8 bases"):
        tokenize_files([str(path)], str(tmp_path / "out"), model, window=4)
