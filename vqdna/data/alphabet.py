"""DNA bytes -> base ids (docs/design.md §1 and 2.5): A C G T N = 0 1 2 3 4, any case; U -> T; every other
IUPAC letter -> N. Whitespace (and line ends) is skipped; any other byte is invalid."""

import numpy as np

BASES = "ACGTN"
NUM_BASES = 5
PAD = 5  # padding id in batches of windows (the models' mask is ids < NUM_BASES)
INVALID = 255  # a byte that is no IUPAC letter
SKIP = 254  # whitespace: dropped

_IUPAC_N = "RYSWKMBDHVN"


def _build_table() -> np.ndarray:
    table = np.full(256, INVALID, dtype=np.uint8)
    for i, base in enumerate("ACGT"):
        table[ord(base)] = table[ord(base.lower())] = i
    table[ord("U")] = table[ord("u")] = 3
    for letter in _IUPAC_N:
        table[ord(letter)] = table[ord(letter.lower())] = 4
    for ws in b" \t\r\n\v\f":
        table[ws] = SKIP
    return table


BYTE_TO_ID = _build_table()
BYTE_TO_ID.setflags(write=False)

# Which strands a sequence model reads: its own ("forward"), or it and its reverse complement ("both").
STRANDS = ("forward", "both")

# The other strand's base id: A C G T N -> T G C A N.
ID_COMPLEMENT = np.array([3, 2, 1, 0, 4], np.uint8)
ID_COMPLEMENT.setflags(write=False)

# The other strand's letter for every IUPAC code (either case; U pairs with A, N and the symmetric S, W stay).
_COMPLEMENT = str.maketrans("ACGTURYKMBVDHSWNacgturykmbvdhswn", "TGCAAYRMKVBHDSWNtgcaayrmkvbhdswn")


def reverse_complement(seq: str) -> str:
    """The other strand of a DNA string, read 5' to 3'. Letters outside IUPAC stay as they are (and are
    refused wherever the string is encoded)."""
    return seq.translate(_COMPLEMENT)[::-1]
