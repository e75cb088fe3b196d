"""An input file's identity (vqdna.data.fingerprint): the sha256 of its first and last PROBE_BYTES, each
byte hashed once, so a changed header, tail or length changes it (probes shrunk to 8 bytes here)."""

import hashlib

import pytest

from vqdna.data import fingerprint

PROBE = 8


@pytest.fixture(autouse=True)
def small_probes(monkeypatch):
    monkeypatch.setattr(fingerprint, "PROBE_BYTES", PROBE)


def _definition(data: bytes) -> str:
    """The documented bytes: the first PROBE, then the last PROBE not already hashed."""
    return hashlib.sha256(data[:PROBE] + data[max(PROBE, len(data) - PROBE) :]).hexdigest()


@pytest.mark.parametrize("size", [0, 1, PROBE - 1, PROBE, PROBE + 1, 2 * PROBE - 1, 2 * PROBE, 2 * PROBE + 1, 5 * PROBE])
def test_hashes_the_head_then_the_unhashed_tail(tmp_path, size):
    data = bytes(range(7, 7 + size))
    path = tmp_path / "f"
    path.write_bytes(data)
    assert fingerprint.head_tail_sha256(str(path), size) == _definition(data)
    if size <= 2 * PROBE:  # a small file is hashed whole, each byte once
        assert fingerprint.head_tail_sha256(str(path), size) == hashlib.sha256(data).hexdigest()


def test_head_tail_and_length_changes_show_a_middle_change_does_not(tmp_path):
    data = bytearray(b"ACGT" * 10)  # 40 bytes: head 0-7, tail 32-39, middle unread
    path = tmp_path / "f"

    def digest(b):
        path.write_bytes(bytes(b))
        return fingerprint.head_tail_sha256(str(path), len(b))

    base = digest(data)
    for pos in (0, PROBE - 1, len(data) - PROBE, len(data) - 1):
        changed = bytearray(data)
        changed[pos] ^= 1
        assert digest(changed) != base, pos
    assert digest(data + b"A") != base and digest(data[:-1]) != base
    middle = bytearray(data)
    middle[20] ^= 1
    assert digest(middle) == base  # by design: it reads O(1) bytes of a file of any size
