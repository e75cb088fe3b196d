"""`vqdna demo` (vqdna/commands/demo.py): it tokenizes the bundled genome with the given tokenizer."""


from tests.streaming._fixtures import model, model_dir, one_thread  # noqa: F401 (fixtures)
from vqdna import cli


def test_demo_tokenizes_the_bundled_genome(model_dir, capsys):
    """`vqdna demo` (tokenization part) on the bundled lambda genome with a given tokenizer."""
    assert cli.main(["demo", "--model", model_dir, "--skip-backends"]) == 0
    out = capsys.readouterr().out
    assert "tokenized" in out and "lambda.fa.gz" in out and "bases    48,502 in the output" in out and "level 1" in out
