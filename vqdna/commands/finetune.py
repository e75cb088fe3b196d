"""`vqdna finetune`: stage-3 LoRA fine-tuning on a GUE-format task folder."""

from __future__ import annotations

import argparse

from vqdna.train.presets import add_preset_arguments, resolve

HELP = "LoRA fine-tuning (stage 3) on a GUE task folder (train/dev/test.csv); test metrics to JSON"


def parse_baseline(text: str) -> int | None:
    """'kmer' -> 6, 'kmer:K' -> K, 'none' -> None (the k of the k-mer baseline)."""
    name, _, k = text.partition(":")
    if name == "none" and not k:
        return None
    if name == "kmer":
        try:
            k = int(k) if k else 6
        except ValueError:
            k = -1
        if 1 <= k <= 8:
            return k
    raise argparse.ArgumentTypeError(f"expected kmer, kmer:K (K in 1..8) or none, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder with train.csv, dev.csv, test.csv (sequence,label)")
    parser.add_argument("--model", required=True, help="pre-trained model folder (from `vqdna pretrain`)")
    parser.add_argument("--out", required=True, help="output folder: runs/ and results.json")
    add_preset_arguments(parser, "finetune")
    parser.add_argument("--seeds", default="0", help="seeds, comma separated (mean and std reported)")
    parser.add_argument("--task", choices=["auto", "classification", "regression"], default="auto")
    parser.add_argument("--max-length", type=int, help="tokens incl. CLS/SEP (default: longest sequence)")
    parser.add_argument("--baseline", type=parse_baseline, default=6, metavar="kmer[:K]|none",
                        help="k-mer frequency baseline on the same splits (default kmer:6): standardised k-mer "
                             "frequencies + logistic regression (ridge for regression), strength chosen on dev among "
                             "the decades 1e-6..1e3; it counts the strands the model reads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")


def run(args: argparse.Namespace) -> int:
    from vqdna.train.finetune import finetune, format_results

    recipe = resolve("finetune", args)
    if args.no_progress:  # also transformers' own bars (loading and writing weights)
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    print(f"finetune: preset {args.preset}: {recipe}", flush=True)
    res = finetune(args.data, args.model, args.out, lrs=recipe.lrs, epochs=recipe.epochs, batch_size=recipe.batch_size,
                   seeds=[int(s) for s in args.seeds.split(",")], task=args.task, max_length=args.max_length,
                   lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                   head_init=recipe.head_init, dropout=recipe.dropout, pooling=recipe.pooling, strands=recipe.strands,
                   window=recipe.window, min_dev_confidence=recipe.min_dev_confidence,
                   baseline_k=args.baseline, progress=not args.no_progress)
    print(format_results(res))
    print(f"results in {args.out}/results.json")
    return 0
