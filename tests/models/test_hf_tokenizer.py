"""VQDNATokenizer (vqdna/models/hf_tokenizer.py): the transformers calling convention over the stage-1 encoder."""

import numpy as np
import pytest
import torch

from tests.train import _mlm
from tests.train._mlm import one_thread  # noqa: F401  (autouse)
from vqdna.models.bert import CLS, PAD, SEP, special_ids
from vqdna.models.hf_tokenizer import VQDNATokenizer, dna_to_ids


def test_call_convention_and_layout():
    tok = _mlm.tokenizer()
    seqs = ["ACGTACGGTTAC", "GGC", "ACGTNNACGTACGATCGATCGTAGCTAGCTAGCATCGA"]
    enc = tok(seqs, padding=True, truncation=True, max_length=20, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (3, 20, 2) and ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert mask.sum(1).tolist() == [14, 5, 20]
    sizes = tok.codebook_sizes
    assert (ids[:, 0] == torch.tensor(special_ids(sizes, CLS))).all()
    assert ids[1, 4].tolist() == special_ids(sizes, SEP) and ids[1, 5:].eq(torch.tensor(special_ids(sizes, PAD))).all()
    # the codes are the stage-1 encoder's, each sequence encoded alone (truncation keeps the first bases)
    for i, s in enumerate(seqs):
        n = min(len(s), 18)
        base = torch.from_numpy(dna_to_ids(s)[:n].astype("int64"))[None]
        want = tok.model.encode(base).long()[0]
        assert torch.equal(ids[i, 1 : n + 1], want), i
    # without truncation the long sequence keeps all its bases
    assert tok(seqs, padding=True, return_tensors="pt")["input_ids"].shape == (3, len(seqs[2]) + 2, 2)
    assert tok(seqs[:2], padding="max_length", max_length=32, return_tensors="pt")["input_ids"].shape == (2, 32, 2)


def test_batched_codes_equal_each_sequence_alone():
    """encode_codes pads short sequences beside long ones in one batch: the padding must be masked, so every
    sequence's codes are those it gets alone."""
    tok = _mlm.tokenizer()
    rng = np.random.default_rng(4)
    seqs = ["".join(rng.choice(list("ACGTN"), size=n)) for n in (1, 2, 5, 9, 13, 20, 33, 47, 64, 3, 17, 80)]
    together = tok.encode_codes(seqs)
    for s, codes in zip(seqs, together):
        assert torch.equal(codes, tok.encode_codes([s])[0]), s


def test_lists_single_strings_and_alphabet():
    tok = _mlm.tokenizer()
    one = tok("acgtu")
    assert len(one["input_ids"]) == 7 and one["attention_mask"] == [1] * 7
    assert one["input_ids"] == tok("ACGTT")["input_ids"]  # lowercase = same base, U = T
    assert tok(["RYKM"])["input_ids"] == tok(["NNNN"])["input_ids"]  # IUPAC ambiguity -> N
    with pytest.raises(ValueError, match=r"sequence 1, position 2: '!'"):
        tok(["ACGT", "AC!T"])
    with pytest.raises(ValueError, match="padding=True"):
        tok(["ACGT", "AC"], return_tensors="pt")
    with pytest.raises(ValueError, match="max_length"):
        tok(["ACGT"], truncation=True, max_length=2)


def test_both_strands():
    """strands="both": rc_input_ids / rc_attention_mask hold the reverse complement of the kept bases (after
    truncation), encoded alone, padded like input_ids; the forward half is what strands="forward" gives."""
    from vqdna.data.alphabet import reverse_complement

    tok = _mlm.tokenizer()
    seqs = ["ACGTACGGTTAC", "GGC", "ACGTNNACGT ACGATCGATCGTAGCTAGCTAGCATCGA"]
    enc = tok(seqs, padding=True, truncation=True, max_length=20, return_tensors="pt", strands="both")
    fwd = tok(seqs, padding=True, truncation=True, max_length=20, return_tensors="pt")
    assert torch.equal(enc["input_ids"], fwd["input_ids"]) and torch.equal(enc["attention_mask"], fwd["attention_mask"])
    assert enc["rc_input_ids"].shape == enc["input_ids"].shape
    assert torch.equal(enc["rc_attention_mask"], enc["attention_mask"])
    for i, s in enumerate(seqs):
        kept = s.replace(" ", "")[:18]
        want = tok([reverse_complement(kept)], padding=True, return_tensors="pt")["input_ids"][0]
        assert torch.equal(enc["rc_input_ids"][i, : len(want)], want), i
    one = tok("ACGTT", strands="both")
    assert one["rc_input_ids"] == tok("AACGT")["input_ids"] and one["rc_attention_mask"] == [1] * 7
    with pytest.raises(ValueError, match="strands"):
        tok("ACGT", strands="reverse")


def test_save_and_load(tmp_path):
    tok = _mlm.tokenizer()
    tok.save_pretrained(tmp_path)
    again = VQDNATokenizer.from_pretrained(tmp_path)
    assert again.tokenizer_sha256 == tok.tokenizer_sha256 and again.model_max_length == tok.model_max_length
    seqs = ["ACGTTGACNNAC", "TTTAGGC"]
    assert torch.equal(again(seqs, padding=True, return_tensors="pt")["input_ids"],
                       tok(seqs, padding=True, return_tensors="pt")["input_ids"])
    # a bare stage-1 directory loads too
    direct = VQDNATokenizer.from_pretrained(tmp_path / "stage1_tokenizer")
    assert direct.tokenizer_sha256 == tok.tokenizer_sha256
    # replaced weights are detected
    other = _mlm.VQDNATokenizerModel(tok.model.config)
    other.save_pretrained(tmp_path / "stage1_tokenizer")
    with pytest.raises(ValueError, match="sha256"):
        VQDNATokenizer.from_pretrained(tmp_path)
