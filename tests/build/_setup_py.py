"""setup.py's build helpers, imported for the tests (not run as __main__: nothing is built)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_py():
    """setup.py as a module: its helpers (`_cuda_home_from_nvcc`, ...) without a build."""
    spec = importlib.util.spec_from_file_location("vqdna_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
