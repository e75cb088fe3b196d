"""Held-out tokenizer evaluation (vqdna/train/evaluate.py): every base of every record counted once, in
consecutive windows; reconstruction accuracy and code usage equal a window-by-window recomputation."""

import copy
import json

import numpy as np
import pytest
import torch

from tests.examples._fixtures import write_fasta
from tests.train import _mlm
from vqdna.models.hf_tokenizer import dna_to_ids
from vqdna.train.evaluate import evaluate_genomes, main

FILES = {
    "a.fa": {"r1": "ACGTTGCAAC" * 13 + "NNNNACG", "r2": "GGC", "empty": ""},  # 137, 3 and 0 bases
    "b.fa": {"s1": "TTAGCCGATCGA" * 9},  # 108 bases
}


def _write(tmp_path):
    """{path: records} of FILES written under tmp_path."""
    return {str(write_fasta(tmp_path / name, list(records.items()))): records for name, records in FILES.items()}


def _by_window(model, files, window):
    """{path: (bases, correct, [set of codes per level])}: each window encoded alone."""
    out = {}
    for path, records in files.items():
        bases, correct, seen = 0, 0, [set() for _ in model.config.codebook_sizes]
        for seq in records.values():
            ids = dna_to_ids(seq, "test")
            for start in range(0, len(ids), window):
                piece = torch.from_numpy(ids[start : start + window].astype(np.int64))[None]
                with torch.no_grad():
                    res = model(piece)
                bases += piece.shape[1]
                correct += int((res.logits.argmax(-1) == piece).sum())
                for level, s in enumerate(seen):
                    s.update(res.codes[0, :, level].tolist())
        out[path] = (bases, correct, seen)
    return out


@pytest.mark.parametrize("window,batch_size", [(64, 3), (50, 64)])
def test_evaluate_genomes_counts_every_base_once(tmp_path, window, batch_size):
    model = copy.deepcopy(_mlm.tokenizer().model)  # its mode changes here; the cached one stays as it is
    model.train()
    files = _write(tmp_path)
    report = evaluate_genomes(model, list(files), window=window, batch_size=batch_size)
    assert model.training  # the caller's mode is restored
    model.eval()
    want = _by_window(model, files, window)
    sizes = list(model.config.codebook_sizes)
    assert report["window"] == window
    for path, records in files.items():
        got, (bases, correct, seen) = report["per_file"][path], want[path]
        assert got["bases"] == bases == sum(len(s) for s in records.values())
        assert got["recon_acc"] == pytest.approx(correct / bases)
        assert got["codes_used"] == [len(s) for s in seen] and got["codebook_sizes"] == sizes
        assert got["used_fraction"] == pytest.approx([len(s) / k for s, k in zip(seen, sizes)])
    every = report["all"]
    assert every["bases"] == sum(w[0] for w in want.values())
    assert every["recon_acc"] == pytest.approx(sum(w[1] for w in want.values()) / every["bases"])
    assert every["codes_used"] == [len(set().union(*(w[2][level] for w in want.values()))) for level in range(len(sizes))]


def test_main_prints_and_writes_the_report(tmp_path, capsys):
    folder = tmp_path / "tok"
    _mlm.tokenizer().model.save_pretrained(folder)
    paths = list(_write(tmp_path))
    assert main([str(folder), *paths, "--window", "64", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["per_file"]) == set(paths) and report["all"]["bases"] == 137 + 3 + 108
    assert report["tokenizer_sha256"] == _mlm.tokenizer().tokenizer_sha256 and report["seconds"] >= 0
    printed = capsys.readouterr().out
    assert "all held-out" in printed and f"{report['all']['bases']:>11,}" in printed
