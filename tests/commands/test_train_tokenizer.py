"""`vqdna train-tokenizer` (vqdna/commands/train_tokenizer.py): a few steps on the bundled phage lambda
genome write the tokenizer, its held-out report and its metrics."""

import json

from tests.train.test_stage1 import LAMBDA, _lambda_ids, _metrics
from vqdna.models.tokenizer_model import VQDNATokenizerModel


def test_cli_smoke(tmp_path, capsys):
    from vqdna.cli import main

    # A 3,000-base slice of lambda as the held-out file: two records, the second shorter than a window.
    ids = _lambda_ids()[:3000]
    held = tmp_path / "held.fa"
    held.write_text(">a\n" + "".join("ACGTN"[i] for i in ids[:2950]) + "\n>b\n" + "".join("ACGTN"[i] for i in ids[2950:]) + "\n")
    out = tmp_path / "tok"
    rc = main([
        "train-tokenizer", "--genomes", LAMBDA, "--steps", "3", "--batch-size", "2", "--warmup-steps", "1",
        "--seq-len", "64", "--out", str(out), "--no-progress", "--log-every", "1", "--holdout", str(held),
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "trained 3 steps" in text and "all held-out" in text
    report = json.loads((out / "holdout.json").read_text())
    assert report["all"]["bases"] == 3000 and 0 <= report["all"]["recon_acc"] <= 1
    assert report["per_file"][str(held)]["bases"] == 3000
    assert len(report["all"]["used_fraction"]) == 2
    assert report["tokenizer_sha256"] == VQDNATokenizerModel.from_pretrained(out).tokenizer_sha256
    assert len(_metrics(out / "metrics.jsonl")) == 3
