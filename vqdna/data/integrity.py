"""What keeps a token directory trustworthy (docs/token-files.md): the names the format defines, the
one-writer lock, temporary files that never follow a planted symlink, and the checksum.

Everything here is about files and names; the shard and manifest formats live in vqdna.streaming.token_files.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
from typing import Optional

__all__ = [
    "CHECKSUM",
    "LOCK_NAME",
    "DirectoryLock",
    "DirectoryLockedError",
    "create_new",
    "file_checksum",
    "foreign_entry",
    "is_shard_name",
    "new_hasher",
    "parse_entry",
    "remove_leftover",
]

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
LOCK_NAME = "tokenize.lock"
# blake2b (hashlib, no extra dependency) with a 16-byte digest: ~0.5-1 GB/s per core, far below the
# cost of computing the codes; hashing is done by the writer thread while the codes are written.
CHECKSUM = "blake2b-128"
DIGEST_SIZE = 16

# shard-NNNNN with at least 5 digits (shard_name pads to 5; index 100000 has 6), no leading zero beyond
# the padding: exactly the names shard_name() produces, so a name maps to one index and back.
_SHARD = re.compile(r"shard-(?:\d{5}|[1-9]\d{5,})")
_ENTRY = re.compile(r"(shard-(?:\d{5}|[1-9]\d{5,}))\.(bin|idx)(\.tmp)?")


def new_hasher():
    """A fresh checksum state (CHECKSUM): .update(bytes-like), .hexdigest(), .digest() (16 bytes)."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def file_checksum(path: str, block: int = 8 << 20) -> str:
    """CHECKSUM of a whole file (hex). Reads in large blocks; hashlib drops the GIL while hashing."""
    h = new_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def is_shard_name(name: str) -> bool:
    """True for a plain shard base name ("shard-00042"): no separator, no "..", nothing else."""
    return isinstance(name, str) and _SHARD.fullmatch(name) is not None


def parse_entry(name: str) -> Optional[tuple[int, str, bool]]:
    """(shard index, "bin"/"idx", is temporary) for a shard file name of the format, else None."""
    m = _ENTRY.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)[len("shard-"):]), m.group(2), m.group(3) is not None


def foreign_entry(directory: str) -> Optional[str]:
    """The first entry (sorted) of `directory` that `vqdna tokenize` would not have written itself,
    with why, or None. Ours: manifest.json(.tmp), the lock file, shard-N.bin/.idx(.tmp), each a
    regular file; a symlink or a directory under one of our names is foreign too."""
    for name in sorted(os.listdir(directory)):
        ours = name in (MANIFEST, MANIFEST + TMP_SUFFIX, LOCK_NAME) or parse_entry(name) is not None
        if not ours:
            return f"{name!r}"
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if stat.S_ISLNK(mode):
            return f"{name!r}, a symbolic link (vqdna writes only regular files it creates itself)"
        if not stat.S_ISREG(mode):
            return f"{name!r}, which is not a regular file"
    return None


def remove_leftover(path: str) -> None:
    """Remove a temporary file a killed run left behind (only a regular file; no error if absent)."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def create_new(path: str, text: bool = False):
    """Open a new file for writing that did not exist: O_CREAT|O_EXCL|O_NOFOLLOW, so a file or a
    symlink planted under the name is never followed nor overwritten (FileExistsError names it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "w" if text else "wb")


class DirectoryLockedError(RuntimeError):
    """Another process holds the directory's lock."""


class DirectoryLock:
    """An exclusive advisory lock (fcntl.flock) on `directory`/tokenize.lock: one writer per token
    directory. The holder writes its pid into the file (for the refusal message) and empties it on
    release, so a finished directory holds the same bytes whoever wrote it. The kernel drops the lock
    when the process dies, even by kill -9. Use as a context manager or call release()."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryLockedError(
                    f"{directory}: another vqdna tokenize is writing this directory "
                    f"(pid {holder or 'unknown'} holds {self.path}); wait for it to finish, or stop it first"
                ) from None
            raise
        self._fd: Optional[int] = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
