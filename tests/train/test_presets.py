"""Named recipes (vqdna/train/presets.py) as the CLI exposes them: preset values, explicit flags winning,
the default preset keeping the pre-preset CLI defaults, and --help naming the CPU preset with its
measured time."""

import dataclasses

import pytest

from vqdna.cli import build_parser
from vqdna.train.presets import FINETUNE_PRESETS, PRETRAIN_PRESETS, resolve

PRETRAIN = ["pretrain", "--tokens", "t", "--out", "o"]
FINETUNE = ["finetune", "--data", "d", "--model", "m", "--out", "o"]


def _recipe(argv):
    args = build_parser().parse_args(argv)
    return resolve(argv[0], args), args


def test_default_preset_is_the_old_cli_defaults():
    """No --preset: the values the CLI used before presets existed (paper's recipe)."""
    recipe, _ = _recipe(PRETRAIN)
    assert recipe == PRETRAIN_PRESETS["paper"]
    assert (recipe.config, recipe.steps, recipe.batch_size, recipe.max_length, recipe.lr, recipe.min_lr,
            recipe.warmup_steps, recipe.mlm_probability, recipe.pooling) == \
        ("bert-base", 100_000, 256, 256, 5e-4, 1e-6, 10_000, 0.25, "cls")
    recipe, _ = _recipe(FINETUNE)
    assert recipe == FINETUNE_PRESETS["paper"]
    assert (recipe.lrs, recipe.epochs, recipe.batch_size, recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout,
            recipe.dropout, recipe.head_init, recipe.pooling, recipe.strands) == \
        ((1e-5, 3e-5, 5e-5), 3, 32, 8, 16, 0.05, 0.0, "probe", None, None)


def test_small_preset_is_the_measured_cpu_recipe():
    """examples/species/run.py's recipe (examples/RESULTS.md)."""
    recipe, _ = _recipe(PRETRAIN + ["--preset", "small"])
    assert (recipe.config, recipe.steps, recipe.batch_size, recipe.max_length, recipe.lr, recipe.warmup_steps,
            recipe.pooling) == ("bert-mini", 1500, 32, 128, 1e-3, 0.1, "mean_layers")
    recipe, _ = _recipe(FINETUNE + ["--preset", "small"])
    assert (recipe.lrs, recipe.epochs, recipe.lora_dropout, recipe.dropout, recipe.pooling, recipe.strands,
            recipe.window) == ((5e-4,), 5, 0.0, 0.0, "mean_wide", "both", 3)


def test_explicit_flags_win_over_any_preset():
    for preset in ("paper", "small"):
        recipe, _ = _recipe(PRETRAIN + ["--preset", preset, "--steps", "7", "--pooling", "mean", "--config", "bert-tiny",
                                        "--warmup-steps", "0.2"])
        assert (recipe.steps, recipe.pooling, recipe.config, recipe.warmup_steps) == (7, "mean", "bert-tiny", 0.2)
        assert recipe.batch_size == PRETRAIN_PRESETS[preset].batch_size  # untouched fields stay the preset's
        recipe, _ = _recipe(FINETUNE + ["--preset", preset, "--lrs", "1e-3,2e-3", "--epochs", "1", "--pooling", "cls",
                                        "--lora-dropout", "0.1", "--strands", "forward"])
        assert (recipe.lrs, recipe.epochs, recipe.pooling, recipe.lora_dropout, recipe.strands) == \
            ((1e-3, 2e-3), 1, "cls", 0.1, "forward")
        assert recipe.lora_r == FINETUNE_PRESETS[preset].lora_r


@pytest.mark.parametrize("argv", [PRETRAIN + ["--pooling", "max"], FINETUNE + ["--pooling", "first"],
                                  FINETUNE + ["--lrs", "1e-3,x"], PRETRAIN + ["--preset", "huge"],
                                  FINETUNE + ["--baseline", "kmer:0"], FINETUNE + ["--baseline", "bpe"],
                                  FINETUNE + ["--strands", "reverse"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_baseline_flag():
    assert _recipe(FINETUNE)[1].baseline == 6
    assert _recipe(FINETUNE + ["--baseline", "kmer:4"])[1].baseline == 4
    assert _recipe(FINETUNE + ["--baseline", "kmer"])[1].baseline == 6
    assert _recipe(FINETUNE + ["--baseline", "none"])[1].baseline is None


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRETRAIN_PRESETS["small"].steps = 10


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_help_says_which_preset_fits_a_cpu(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = " ".join(sub.format_help().split())
    assert "--preset {paper,small}" in text and "fits a CPU" in text and "examples/RESULTS.md" in text
    assert ("14.8 min" if command == "pretrain" else "31 min per seed") in text
    assert "--pooling" in text and "--no-progress" in text
    # each flag names the presets' values
    assert ("small: mean_layers" if command == "pretrain" else "small: mean_wide") in text
    if command == "finetune":
        assert "--strands {forward,both}" in text and "small: both" in text and "small: 3)" in text
