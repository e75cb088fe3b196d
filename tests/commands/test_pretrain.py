"""`vqdna pretrain` (vqdna/commands/pretrain.py): a few steps on token files written by vqdna.streaming;
token files of another tokenizer are refused."""

import pytest

from tests.train import _mlm
from tests.train._mlm import one_thread  # noqa: F401  (autouse)


def test_cli_pretrain_on_token_files(tmp_path, capsys):
    """`vqdna pretrain` on token files written by vqdna.streaming (the bundled phage lambda genome, 48 kb)."""
    from transformers import AutoModelForMaskedLM

    from vqdna.cli import main
    from vqdna.data import bundled_fasta
    from vqdna.data import TokenDataset
    from vqdna.streaming import tokenize_files

    tok = _mlm.tokenizer()
    tokenize_files([bundled_fasta()], str(tmp_path / "tokens"), tok.model, window=4096, device="cpu")
    records = TokenDataset(tmp_path / "tokens")
    assert records.manifest["tokenizer"]["sha256"] == tok.tokenizer_sha256
    out = tmp_path / "mlm"
    argv = ["pretrain", "--tokens", str(tmp_path / "tokens"), "--tokenizer", f"{_mlm.ROOT}/stage1", "--config",
            "bert-tiny", "--out", str(out), "--steps", "4", "--batch-size", "8", "--max-length", "32",
            "--warmup-steps", "1", "--logging-steps", "2", "--save-steps", "4", "--pooling", "mean", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "pretrain: 4 steps" in captured.out and "preset paper" in captured.out
    assert "it/s]" not in captured.err  # --no-progress: no tqdm bar (Trainer's or transformers' own)
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.train_max_length == 32 and model.config.tokenizer_sha256 == tok.tokenizer_sha256
    assert model.config.classifier_pooling == "mean"  # --pooling is saved for fine-tuning
    # token files from another tokenizer are refused
    other = _mlm.VQDNATokenizerModel(tok.model.config)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="written by tokenizer sha256"):
        main(argv[:4] + [str(tmp_path / "other")] + argv[5:])
