"""examples/gue/prom_core_tata_tiny.sh on a tiny GUE-format task and genome slice in the data layout docs/data.md
describes: by default its three `vqdna` commands are parsed by the real CLI parser and their inputs checked (a few
seconds); the `slow` test runs them (tokenize -> pretrain -> finetune, three processes, ~40 s on a loaded CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.examples._fixtures import random_dna, write_fasta, write_gue_task

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "gue" / "prom_core_tata_tiny.sh"


def _env(**extra):
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1")
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_gue_task(root / "gue" / "prom" / "prom_core_tata")
    (root / "genomes").mkdir()
    write_fasta(root / "genomes" / "human_chr17_hg19_part.fa", [("chr17", random_dna(np.random.default_rng(1), 3000, 0.4))])
    return root


# Stands in for PY: `-m vqdna.cli ARGS` is parsed by the CLI's parser (exit 2 on an unknown flag) and
# logged, not run; anything else (the script's inline Python) runs on the real interpreter.
SHIM = """#!{python}
import json, os, sys
if sys.argv[1:3] == ["-m", "vqdna.cli"]:
    from vqdna.cli import build_parser
    build_parser().parse_args(sys.argv[3:])
    with open(os.environ["SHIM_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[3:]) + "\\n")
else:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_gue_example_commands_parse_and_find_their_data(tmp_path):
    root = _data_root(tmp_path)
    shim = tmp_path / "py"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    log, out = tmp_path / "commands.jsonl", tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "vqdna-small", str(out), str(root)], cwd=REPO, capture_output=True,
                          text=True, env=_env(PY=str(shim), SHIM_LOG=str(log)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in commands] == ["tokenize", "pretrain", "finetune"]
    tokenize, _, finetune = commands
    inputs = tokenize[1 : tokenize.index("--out")]
    assert inputs == [str(out / "train_seqs.fa"), str(root / "genomes" / "human_chr17_hg19_part.fa")]
    assert (out / "train_seqs.fa").read_text().count(">") == 48  # the train split's sequences, labels dropped
    task = Path(finetune[finetune.index("--data") + 1])
    assert sorted(p.name for p in task.iterdir()) == ["dev.csv", "test.csv", "train.csv"]


@pytest.mark.slow
def test_gue_example_runs_on_a_tiny_task(tmp_path):
    root = _data_root(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "vqdna-small", str(out), str(root)], cwd=REPO, capture_output=True,
                          text=True, env=_env(STEPS="2", LRS="1e-3", EPOCHS="1"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "tokens" / "manifest.json").exists()
    result = json.loads((out / "finetune" / "results.json").read_text())
    assert -1.0 <= result["test"]["mcc"]["mean"] <= 1.0


def test_gue_example_needs_the_data_root(tmp_path):
    """No default data location: the third argument is required."""
    proc = subprocess.run(["bash", str(SCRIPT), "vqdna-small", str(tmp_path / "out")], capture_output=True, text=True,
                          env=_env())
    assert proc.returncode == 2 and "DATA_ROOT" in proc.stderr
    assert not (tmp_path / "out").exists()


SMALL = REPO / "examples" / "small_preset.sh"


def test_small_preset_script_runs_the_cli_recipe(tmp_path):
    """examples/small_preset.sh: tokenize (task train sequences + the FASTA given) -> pretrain --preset small ->
    finetune --preset small over seeds 0,1,2, each parsed by the real CLI parser."""
    root = _data_root(tmp_path)
    shim = tmp_path / "py"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    log, out, task = tmp_path / "commands.jsonl", tmp_path / "out", root / "gue" / "prom" / "prom_core_tata"
    genome = root / "genomes" / "human_chr17_hg19_part.fa"
    proc = subprocess.run(["bash", str(SMALL), str(task), str(out), str(genome)], cwd=REPO, capture_output=True,
                          text=True, env=_env(PY=str(shim), SHIM_LOG=str(log)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tokenize, pretrain, finetune = [json.loads(line) for line in log.read_text().splitlines()]
    assert tokenize[0] == "tokenize" and tokenize[1:3] == [str(out / "train_seqs.fa"), str(genome)]
    assert pretrain[0] == "pretrain" and pretrain[pretrain.index("--preset") + 1] == "small"
    assert finetune[0] == "finetune" and finetune[finetune.index("--preset") + 1] == "small"
    assert finetune[finetune.index("--seeds") + 1] == "0,1,2" and finetune[finetune.index("--data") + 1] == str(task)
    assert [line.split()[0] for line in (out / "times.txt").read_text().splitlines()] == ["tokenize", "pretrain", "finetune"]
    bad = subprocess.run(["bash", str(SMALL), str(task)], capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and "usage" in bad.stderr
