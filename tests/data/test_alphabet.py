"""reverse_complement against the IUPAC pairing written out letter by letter (independently of the table)."""

import random

import pytest

from vqdna.data.alphabet import BYTE_TO_ID, reverse_complement

PAIRS = {"A": "T", "C": "G", "G": "C", "T": "A", "U": "A", "R": "Y", "Y": "R", "K": "M", "M": "K", "B": "V",
         "V": "B", "D": "H", "H": "D", "S": "S", "W": "W", "N": "N"}


def test_reverse_complement_examples():
    assert reverse_complement("AACGTN") == "NACGTT"
    assert reverse_complement("acgU") == "Acgt"  # case kept; U pairs with A
    assert reverse_complement("") == ""


@pytest.mark.parametrize("seed", range(5))
def test_reverse_complement_random(seed):
    r = random.Random(seed)
    letters = "".join(PAIRS) + "".join(PAIRS).lower()
    seq = "".join(r.choice(letters) for _ in range(r.randint(1, 300)))
    want = "".join(PAIRS[c.upper()] if c.isupper() else PAIRS[c.upper()].lower() for c in reversed(seq))
    assert reverse_complement(seq) == want
    rc = reverse_complement(seq)
    assert reverse_complement(rc) == seq.replace("U", "T").replace("u", "t")  # an involution up to U -> T
    # base ids: A C G T map to T G C A, every N-class letter to N
    ids, rc_ids = BYTE_TO_ID[list(seq.encode())], BYTE_TO_ID[list(rc.encode())][::-1]
    comp = [3, 2, 1, 0, 4]
    assert [comp[i] for i in ids] == list(rc_ids)


def test_reverse_complement_leaves_non_iupac_bytes_for_the_encoder_to_refuse():
    assert reverse_complement("AC-X") == "X-GT"
