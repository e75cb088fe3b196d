"""vqdna/kernels/ops/: every op folder is declared once and its declaration agrees with the files
(the checklist of docs/adding-an-op.md, checked)."""

import importlib.util
import re
from pathlib import Path

import pytest

import vqdna.kernels
from vqdna.kernels.ops.registry import declarations

ROOT = Path(__file__).resolve().parents[3]
OPS_DIR = ROOT / "vqdna" / "kernels" / "ops"
CSRC_OPS = ROOT / "csrc" / "ops"


def test_every_op_folder_is_registered():
    folders = {p.parent.name for p in OPS_DIR.glob("*/declaration.py")}
    assert folders == set(declarations()), "an op folder without its line in vqdna/kernels/ops/__init__.py (or the reverse)"


@pytest.mark.parametrize("op", list(declarations()))
def test_declaration_matches_the_files(op):
    decl = declarations()[op]
    assert decl.name == op and getattr(vqdna.kernels, op).__module__ == f"vqdna.kernels.ops.{op}.wrapper"
    assert op in vqdna.kernels.__all__
    if decl.reference is None:
        assert decl.uses and set(decl.uses) <= set(declarations()), "a composite names the ops it runs on"
    else:
        assert decl.fake is not None, "one fake for every backend op"
    schema = (CSRC_OPS / op / "schema.cpp").read_text() if decl.compiled else ""
    for backend, source in (("native", "cpu.cpp"), ("cuda", "cuda.cu")):
        if backend in decl.compiled:
            assert re.search(rf'm\.def\("{op}_{backend}\(', schema), f"csrc/ops/{op}/schema.cpp lacks {op}_{backend}"
            assert (CSRC_OPS / op / source).is_file()
    if decl.triton:
        assert decl.triton == f"vqdna.kernels.ops.{op}.triton_kernel"
        assert importlib.util.find_spec(decl.triton) is not None
    if decl.bench:
        module, function = decl.bench[1].split(":")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("op", [op for op, d in declarations().items() if d.reference is not None and d.compiled])
def test_compiled_schemas_match_the_reference(op):
    """Every backend op is called with the same arguments and shares one fake: the C++ schemas
    (csrc/ops/<op>/schema.cpp) must take exactly what the declaration's reference function takes."""
    import torch

    def args(schema):
        return [(a.name, str(a.type), a.default_value) for a in schema.arguments], [str(r.type) for r in schema.returns]

    want = args(getattr(torch.ops.vqdna, f"{op}_reference").default._schema)
    for backend in declarations()[op].compiled:
        if not hasattr(torch.ops.vqdna, f"{op}_{backend}"):
            pytest.skip("vqdna._C is not built")
        assert args(getattr(torch.ops.vqdna, f"{op}_{backend}").default._schema) == want, f"vqdna::{op}_{backend}"


def test_composite_runs_where_its_ops_run():
    kmeans = declarations()["kmeans"]
    assert kmeans.backends == declarations()["lookup"].backends == ("cuda", "triton", "native", "reference")


def test_cli_bench_ops_follow_the_declarations():
    """vqdna/commands/bench.py keeps its own copy of the op names (it must not import torch to build
    the parser); it has to name what the declarations do."""
    from vqdna.bench import OPS
    from vqdna.commands import bench as command

    assert tuple(command._OPS) == OPS
