"""`vqdna finetune` (vqdna/commands/finetune.py): clean logs (issue 18) - no load report for the expected
head swap (a real mismatch still raises), no CPU pin_memory or is_gradient_checkpointing warnings, no
progress bars with --no-progress, the passive OpenMP wait policy applied - and the preset's choices in
results.json."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from tests.train import _mlm
from tests.train._mlm import one_thread  # noqa: F401  (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_head_swap_loads_silently_and_a_real_mismatch_raises(tmp_path, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    from vqdna.models.bert import load_classifier

    folder, _ = _mlm.pretrained()
    caplog.clear()
    model = load_classifier(folder, num_labels=2)
    assert model.classifier.out_features == 2
    assert "LOAD REPORT" not in caplog.text  # the masked LM's head dropped, a new one: expected
    for kind, edit in (("missing", lambda s: s.pop("vqdna.layers.0.query.weight")),
                       ("unexpected", lambda s: s.__setitem__("vqdna.layers.0.extra.weight", s["transform.0.weight"].clone()))):
        broken = tmp_path / kind
        shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("checkpoint-*"))
        state = load_file(broken / "model.safetensors")
        edit(state)
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        caplog.clear()
        with pytest.raises(ValueError, match=rf"{kind} keys: .*layers\.0\.(query|extra)\.weight"):
            load_classifier(str(broken), num_labels=2)
        assert "LOAD REPORT" in caplog.text  # transformers' report stays for real problems


def test_apply_lora_raises_no_future_warning():
    from vqdna.models.bert import load_classifier
    from vqdna.train.finetune import apply_lora

    folder, _ = _mlm.pretrained()
    model = load_classifier(folder, num_labels=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model)
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]


def test_cli_finetune_log_is_clean(tmp_path):
    """`python -m vqdna.cli finetune --preset small --no-progress` on a tiny task: every warning shown
    (PYTHONWARNINGS=default), none of the issue's items in stdout or stderr; the run applied the passive
    OpenMP policy itself; results.json carries the preset's pooling and strands, the chosen model and the
    baseline."""
    folder, _ = _mlm.pretrained()
    data = _mlm.write_gue(tmp_path / "task", sizes=(48, 24, 24))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONWARNINGS="default", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vqdna.cli", "finetune", "--data", str(data), "--model", folder,
                           "--out", str(out), "--preset", "small", "--epochs", "1", "--batch-size", "16",
                           "--baseline", "kmer:3", "--no-progress"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    for item in ("LOAD REPORT", "UNEXPECTED", "MISSING", "pin_memory", "is_gradient_checkpointing", "FutureWarning",
                 "it/s]"):  # it/s]: a tqdm bar
        assert item not in log, log
    res = json.loads((out / "results.json").read_text())
    assert res["runtime"]["omp_wait_policy"] == "PASSIVE"
    assert res["pooling"] == "mean_wide" and res["window"] == 3 and res["lrs"] == [5e-4] and res["lora"]["dropout"] == 0.0
    assert res["strands"] == "both" and res["baseline"]["strands"] == "both"
    assert res["baseline"]["k"] == 3 and res["chosen"][0]["source"] in ("probe", "finetuned")
    assert "3-mer frequencies (both strands) + logistic regression" in proc.stdout
    assert "its linear-probe head alone" in proc.stdout
