"""vqdna/__init__.py: `import vqdna` / `import vqdna.kernels` load the kernels only (no transformers), the model
layer's names still resolve, and a VQDNATokenizer registers the "vqdna" model type with the Auto classes.
Each check runs in a fresh interpreter: in this one, other tests have imported everything already."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernels_do_not_import_the_model_layer():
    out = _python("""
        import sys
        import torch
        import vqdna.kernels
        codes, _ = vqdna.kernels.lookup(torch.eye(3), torch.eye(3), backend="reference")
        assert codes.tolist() == [0, 1, 2]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith("vqdna.models."))
        print(heavy)
    """)
    assert out.strip() == "[]"


def test_model_names_resolve_lazily_and_register_the_auto_classes():
    out = _python("""
        import sys
        import vqdna
        assert "transformers" not in sys.modules
        assert {"VectorQuantizer", "VQDNAConfig", "VQDNATokenizer", "VQDNATokenizerModel"} <= set(dir(vqdna))
        from vqdna import VectorQuantizer
        assert VectorQuantizer is vqdna.models.quantizer.VectorQuantizer
        from vqdna import VQDNATokenizer  # the stage-2/3 tokenizer: its models then load with AutoModel*
        from transformers import AutoConfig
        config = AutoConfig.for_model("vqdna")  # before anything else imports vqdna.models.bert
        from vqdna.models.bert import VQDNAConfig
        assert type(config) is VQDNAConfig and vqdna.VQDNAConfig is VQDNAConfig
        assert vqdna.data.read_fasta is not None
        print("ok")
    """)
    assert out.strip() == "ok"
