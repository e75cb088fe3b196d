"""vqdna.kernels.compile_marks: the kernels mark functions for torch.compile without importing
torch._dynamo; the mark must stay what torch's own decorator sets."""

import subprocess
import sys
from pathlib import Path

import torch

import vqdna

from vqdna.kernels.compile_marks import assume_constant_result


def test_mark_matches_torch():
    def ours():
        return 1

    def theirs():
        return 1

    assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(ours)


def test_kernels_import_without_dynamo_or_transformers():
    """The kernels package alone (vqdna/__init__.py, which also loads the model layer, stubbed out)
    and a CPU lookup load neither torch._dynamo (about 1 s) nor transformers."""
    package = str(Path(vqdna.__file__).parent)
    code = (
        "import sys, types\n"
        f"stub = types.ModuleType('vqdna'); stub.__path__ = [{package!r}]; sys.modules['vqdna'] = stub\n"
        "import torch, vqdna.kernels as k\n"
        "k.lookup(torch.randn(8, 4), torch.randn(3, 4))\n"
        "bad = [m for m in ('torch._dynamo', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
