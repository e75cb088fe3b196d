"""Named recipes for `vqdna pretrain` and `vqdna finetune`: the one place their values live.

A preset is a frozen dataclass; the CLI adds one flag per field (default None = "take the preset's"),
so every field is overridable and an explicit flag always wins. `--preset paper` (the default: the
CLI's behaviour before presets existed) is the paper's recipe, meant for GPUs; `--preset small` is the
recipe measured on a 2-core CPU in examples/RESULTS.md (species example: bert-mini, 1,500 steps; fine-tuning
with `mean_wide` pooling over windows of 3 tokens, LoRA from the probe head at lr 5e-4 for 5 epochs, LoRA and
model dropout 0, both strands).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from vqdna.models.bert import CLASSIFIER_WIDTH, POOLINGS, STRANDS

DEFAULT_PRESET = "paper"


@dataclass(frozen=True)
class PretrainRecipe:
    """Stage-2 masked-LM recipe (see vqdna.train.pretrain.pretrain for the meaning of each field)."""

    config: str  # named encoder size (vqdna.models.bert.NAMED_CONFIGS)
    steps: int
    batch_size: int  # global batch (split over torchrun ranks)
    max_length: int  # tokens per window, CLS and SEP included
    lr: float  # peak learning rate (linear warm-up, cosine decay to min_lr)
    min_lr: float
    warmup_steps: float  # steps, or a fraction of steps when < 1
    mlm_probability: float
    pooling: str  # classifier pooling saved in the model's config: one of bert.POOLINGS


@dataclass(frozen=True)
class FinetuneRecipe:
    """Stage-3 LoRA recipe (see vqdna.train.finetune.finetune)."""

    lrs: tuple[float, ...]  # learning-rate grid; (lr, epoch) chosen on dev
    epochs: int
    batch_size: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    dropout: float  # model dropout (hidden, attention, classifier) while fine-tuning
    head_init: str  # probe | random
    pooling: str | None  # classifier pooling; None keeps the pre-trained model's
    strands: str | None  # forward | both (the mean over each sequence and its reverse complement); None: the model's
    window: int | None  # tokens "mean_wide"'s token layer reads at a time (config.classifier_window); None: the model's
    min_dev_confidence: float  # a fine-tuned model replaces its probe head only when it beats it in this
    # fraction of paired bootstrap resamples of dev (vqdna.train.finetune.dev_win_probability)


PRETRAIN_PRESETS = {
    # the paper's stage 2 (BERT-base, 100 k steps of 256 windows of 256 tokens): a GPU recipe
    "paper": PretrainRecipe(config="bert-base", steps=100_000, batch_size=256, max_length=256, lr=5e-4, min_lr=1e-6,
                            warmup_steps=10_000, mlm_probability=0.25, pooling="cls"),
    # examples/species/run.py, measured in examples/RESULTS.md: 14.8 min on an idle 2-core CPU
    "small": PretrainRecipe(config="bert-mini", steps=1500, batch_size=32, max_length=128, lr=1e-3, min_lr=1e-6,
                            warmup_steps=0.1, mlm_probability=0.25, pooling="mean_layers"),
}

FINETUNE_PRESETS = {
    "paper": FinetuneRecipe(lrs=(1e-5, 3e-5, 5e-5), epochs=3, batch_size=32, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                            dropout=0.0, head_init="probe", pooling=None, strands=None, window=None,
                            min_dev_confidence=0.95),
    # measured in examples/RESULTS.md: window 3 raised the mean_wide probe's dev MCC on all three tasks there
    # (tata +0.013, mouse +0.069, species +0.030 over window 1; width 1024 instead of 2048 lost 0.036 on mouse)
    "small": FinetuneRecipe(lrs=(5e-4,), epochs=5, batch_size=32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                            dropout=0.0, head_init="probe", pooling="mean_wide", strands="both", window=3,
                            min_dev_confidence=0.95),
}

# What --help says about each preset: measured numbers only (examples/RESULTS.md).
PRESET_HELP = {
    "pretrain": "paper (default): the paper's recipe, bert-base, 100,000 steps of batch 256 - a GPU recipe, not "
                "run on a CPU here; small: bert-mini, 1,500 steps of batch 32, 128 tokens - fits a CPU: 14.8 min "
                "on an idle 2-core machine (examples/RESULTS.md, species example)",
    "finetune": "paper (default): lr grid 1e-5,3e-5,5e-5, 3 epochs, LoRA dropout 0.05, the model's pooling and strands; "
                "small: lr 5e-4, 5 epochs, LoRA dropout 0, mean_wide pooling over windows of 3 tokens, both strands "
                "- fits a CPU: 31 min per seed of a bert-mini on GUE prom_core_tata (4,904 training sequences of "
                "70 bp), one thread beside another run on a 2-core machine (examples/RESULTS.md)",
}


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _pooling(text: str) -> str:
    if text not in POOLINGS:
        raise argparse.ArgumentTypeError(f"expected one of {'|'.join(POOLINGS)}, got {text!r}")
    return text


# argparse type and help per field (the help names each preset's value, read from the presets)
_FIELD_ARGS = {
    "config": (str, "named model size: bert-base, bert-small (4 x 256), bert-mini (4 x 128), bert-tiny (2 x 64)"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "global batch (split over torchrun ranks)"),
    "max_length": (int, "tokens per window, CLS and SEP included"),
    "lr": (float, "peak learning rate"),
    "min_lr": (float, "final learning rate of the cosine decay"),
    "warmup_steps": (float, "steps, or a fraction of --steps when < 1"),
    "mlm_probability": (float, "fraction of positions masked"),
    "pooling": (_pooling, "classifier input: cls (the CLS token), mean (the last layer's token mean), mean_layers "
                          "(the token means of the embeddings and of every layer, concatenated) or mean_wide (the "
                          f"token mean of a wide ReLU layer on those states: {CLASSIFIER_WIDTH} nonlinear features)"),
    "strands": (str, "forward: the head reads each sequence; both: the mean of its features over the sequence and its "
                     "reverse complement (twice the compute per sequence)"),
    "window": (int, "with mean_wide: the token layer reads the states of this many consecutive tokens, concatenated, "
                    "and the mean runs over every such window (a bag of window features, as a k-mer count is one of "
                    "k bases); its cost per token grows with it"),
    "lrs": (_parse_floats, "learning-rate grid, comma separated"),
    "epochs": (int, "epochs per run (the best epoch, the probe head as epoch 0, is chosen on dev)"),
    "lora_r": (int, "LoRA rank"),
    "lora_alpha": (int, "LoRA alpha"),
    "lora_dropout": (float, "dropout on the LoRA adapters' input"),
    "dropout": (float, "model dropout (hidden, attention, classifier) while fine-tuning; the probe head is fitted on "
                       "dropout-free features"),
    "head_init": (str, "probe: start from a linear-probe head fitted on the frozen features (LP-FT); random: a random head"),
    "min_dev_confidence": (float, "with the probe head: a fine-tuned model is reported instead of its probe head only "
                                  "when it beats it in at least this fraction of paired bootstrap resamples of dev "
                                  "(0: any dev gain)"),
}
_CHOICES = {"head_init": ("probe", "random"), "strands": STRANDS}


def _show(value) -> str:
    if value is None:
        return "the model's own"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_preset_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """--preset plus one flag per recipe field (default None: the preset's value)."""
    presets = PRETRAIN_PRESETS if command == "pretrain" else FINETUNE_PRESETS
    parser.add_argument("--preset", choices=sorted(presets), default=DEFAULT_PRESET,
                        help="named recipe; every value can be overridden by its own flag. " + PRESET_HELP[command])
    for field in dataclasses.fields(next(iter(presets.values()))):
        kind, text = _FIELD_ARGS[field.name]
        values = "; ".join(f"{name}: {_show(getattr(p, field.name))}" for name, p in presets.items())
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                            choices=_CHOICES.get(field.name), help=f"{text} ({values})",
                            metavar="{" + ",".join(POOLINGS) + "}" if field.name == "pooling" else None)


def resolve(command: str, args: argparse.Namespace):
    """The recipe of args.preset with every field the user gave on the command line replaced."""
    presets = PRETRAIN_PRESETS if command == "pretrain" else FINETUNE_PRESETS
    preset = presets[args.preset]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(preset) if getattr(args, f.name, None) is not None}
    return dataclasses.replace(preset, **given)
