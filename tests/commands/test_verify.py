"""`vqdna verify` (vqdna/commands/verify.py): a clean directory verifies, each damaged file is one line
naming it, and the exit code says so."""

import os
import shutil

from tests.streaming._fixtures import clean, model, one_thread  # noqa: F401 (fixtures)
from vqdna import cli


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
