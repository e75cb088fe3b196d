"""vqdna.data.integrity: the format's names, the one-writer lock, never-following temporary files,
the checksum."""

import hashlib
import os
import subprocess
import sys

import pytest

from vqdna.data.integrity import (
    DirectoryLock,
    DirectoryLockedError,
    create_new,
    file_checksum,
    foreign_entry,
    is_shard_name,
    parse_entry,
)
from vqdna.streaming.token_files import shard_name


def test_names_are_exactly_the_formats():
    for k in (0, 7, 99999, 100000, 1234567):
        name = shard_name(k)
        assert is_shard_name(name) and parse_entry(name + ".bin") == (k, "bin", False)
        assert parse_entry(name + ".idx.tmp") == (k, "idx", True)
    for bad in ("shard-0", "shard-000001", "shard-00000/..", "../shard-00000", "/abs/shard-00000", "shard-notes",
                " shard-00000", "shard-00000\n", "shard-00000.bin"):
        assert not is_shard_name(bad) and parse_entry(bad + ".bin") is None, bad
    for bad in ("shard-00000.bin.bak", "shard-00000.txt", "shard-00000", "shard-old", "shard-00000.tmp"):
        assert parse_entry(bad) is None, bad
    assert not is_shard_name(None)


def test_foreign_entry(tmp_path):
    assert foreign_entry(str(tmp_path)) is None
    for name in ("manifest.json", "manifest.json.tmp", "tokenize.lock", "shard-00000.bin", "shard-00003.idx.tmp"):
        (tmp_path / name).write_text("")
    assert foreign_entry(str(tmp_path)) is None
    (tmp_path / "shard-plan.md").write_text("")
    assert foreign_entry(str(tmp_path)) == "'shard-plan.md'"
    os.remove(tmp_path / "shard-plan.md")
    os.symlink(tmp_path / "manifest.json", tmp_path / "shard-00001.bin")
    assert "symbolic link" in foreign_entry(str(tmp_path))
    os.remove(tmp_path / "shard-00001.bin")
    (tmp_path / "shard-00001.idx").mkdir()
    assert "not a regular file" in foreign_entry(str(tmp_path))


def test_create_new_never_follows_nor_overwrites(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "link.tmp")
    with pytest.raises(FileExistsError):
        create_new(str(tmp_path / "link.tmp"))
    (tmp_path / "plain.tmp").write_text("old")
    with pytest.raises(FileExistsError):
        create_new(str(tmp_path / "plain.tmp"))
    assert victim.read_text() == "keep" and (tmp_path / "plain.tmp").read_text() == "old"
    with create_new(str(tmp_path / "new.tmp"), text=True) as f:
        f.write("x")
    assert (tmp_path / "new.tmp").read_text() == "x"


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with DirectoryLock(str(tmp_path)) as lock:
        assert open(lock.path).read() == f"{os.getpid()}\n"
        with pytest.raises(DirectoryLockedError, match=f"{tmp_path}: another vqdna tokenize .*pid {os.getpid()}"):
            DirectoryLock(str(tmp_path))  # another open file description: flock conflicts within one process too
        # ... and for another process (plain flock, without importing vqdna: fast)
        probe = "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)"
        done = subprocess.run([sys.executable, "-c", probe, lock.path], capture_output=True, text=True)
        assert done.returncode != 0 and "BlockingIOError" in done.stderr
    assert open(tmp_path / "tokenize.lock").read() == ""  # a finished directory does not record a pid
    DirectoryLock(str(tmp_path)).release()


def test_file_checksum_is_blake2b_128(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(str(tmp_path / "f"), block=1 << 20) == hashlib.blake2b(data, digest_size=16).hexdigest()
