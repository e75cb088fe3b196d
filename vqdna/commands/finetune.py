"""`vqdna finetune`: stage-3 LoRA fine-tuning on a GUE-format task folder."""

from __future__ import annotations

import argparse

HELP = "LoRA fine-tuning (stage 3) on a GUE task folder (train/dev/test.csv); test metrics to JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder with train.csv, dev.csv, test.csv (sequence,label)")
    parser.add_argument("--model", required=True, help="pre-trained model folder (from `vqdna pretrain`)")
    parser.add_argument("--out", required=True, help="output folder: runs/ and results.json")
    parser.add_argument("--lrs", default="1e-5,3e-5,5e-5", help="learning-rate grid, comma separated")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the best epoch is chosen on dev)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="0", help="seeds, comma separated (mean and std reported)")
    parser.add_argument("--task", choices=["auto", "classification", "regression"], default="auto")
    parser.add_argument("--max-length", type=int, help="tokens incl. CLS/SEP (default: longest sequence)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="model dropout (hidden, attention, classifier) while fine-tuning; the probe head is "
                             "fitted on dropout-free features")
    parser.add_argument("--head-init", choices=["probe", "random"], default="probe",
                        help="probe: start from a linear-probe head fitted on the frozen features (LP-FT); "
                             "random: a random head")


def run(args: argparse.Namespace) -> int:
    from vqdna.train.finetune import finetune

    res = finetune(args.data, args.model, args.out, lrs=[float(x) for x in args.lrs.split(",")], epochs=args.epochs,
                   batch_size=args.batch_size, seeds=[int(s) for s in args.seeds.split(",")], task=args.task,
                   max_length=args.max_length, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                   lora_dropout=args.lora_dropout, head_init=args.head_init, dropout=args.dropout)
    m = res["metric"]
    if res["probe"]:
        print(f"probe head before fine-tuning: dev {m} {res['probe']['dev'][m]:.4f}, test {m} {res['probe']['test'][m]:.4f}")
    print(f"finetune {res['task']}: test {m} {res['test'][m]['mean']:.4f} ± {res['test'][m]['std']:.4f} over "
          f"{len(res['seeds'])} seed(s); " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in res["test"].items() if k != m)
          + f"; results in {args.out}/results.json")
    return 0
