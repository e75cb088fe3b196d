"""examples/species/run.py end to end on tiny random genomes (named as the real ones, docs/data.md): all
three stages and the 6-mer baseline run, with a few steps of a tiny model, and results.json is written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.examples._fixtures import random_dna, write_fasta
from tests.train._mlm import one_thread  # noqa: F401  (autouse)

pytest.importorskip("sklearn")
pytest.importorskip("peft")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "species" / "run.py"


def _example():
    spec = importlib.util.spec_from_file_location("species_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_species_example_runs_on_tiny_genomes(tmp_path, monkeypatch, capsys):
    run = _example()
    genomes = tmp_path / "genomes"
    genomes.mkdir()
    rng = np.random.default_rng(0)
    files = [f for pair in run.SPECIES.values() for f in pair if f]
    for i, name in enumerate(files):  # 2.5 kb per file, a different G+C per species
        write_fasta(genomes / name, [(f"rec{i}", random_dna(rng, 2500, 0.3 + 0.1 * (i % 5)))])
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        str(EXAMPLE), "--genomes", str(genomes), "--out", str(out), "--tokenizer", "vqdna-small",
        "--window", "60", "--train-windows", "8", "--eval-windows", "4", "--pretrain-bases", "2000",
        "--pretrain-steps", "2", "--max-length", "64", "--config", "bert-tiny", "--lrs", "1e-3", "--epochs", "1"])
    assert run.main() == 0
    result = json.loads((out / "results.json").read_text())
    assert result["species"] == list(run.SPECIES)
    assert result["windows"] == {"train": 40, "dev": 20, "test": 20}
    for block in (result["baseline_6mer_lr"], result["vqdna"], result["probe_head"]):
        assert -1.0 <= block["mcc"] <= 1.0
    assert "test MCC: VQDNA" in capsys.readouterr().out
    # --prepare-only (for the CLI recipe, examples/small_preset.sh) draws the same task and pre-training data
    argv = sys.argv[:]
    argv[argv.index("--out") + 1] = str(tmp_path / "prepared")
    monkeypatch.setattr(sys, "argv", argv + ["--prepare-only"])
    assert run.main() == 0
    for split in ("train", "dev", "test"):
        assert (tmp_path / "prepared" / "task" / f"{split}.csv").read_bytes() == (out / "task" / f"{split}.csv").read_bytes()
    fasta = (tmp_path / "prepared" / "pretrain.fa").read_text().split()
    assert len(fasta) == 2 * 5 * 2 and all(len(x) == 1000 for x in fasta[1::2])  # 2 kb per species, 1 kb chunks
    assert not (tmp_path / "prepared" / "mlm").exists()


def test_species_example_needs_the_genome_folder(monkeypatch, tmp_path):
    """No default data location: --genomes is required."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        _example().main()
    assert exc.value.code == 2
