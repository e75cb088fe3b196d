"""`vqdna train-tokenizer`: stage-1 training of the VQ-VAE / HRQ tokenizer on FASTA genomes."""

from __future__ import annotations

import argparse

HELP = "train the genome tokenizer (stage 1) on FASTA files; optional held-out report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--genomes", nargs="+", required=True, metavar="FASTA", help="training FASTA files (plain, gz, xz)")
    parser.add_argument("--config", default="vqdna-small", help="named config (vqdna-small, vqdna-base, vqdna-base-vq) or a config directory")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True, help="output directory: config.json + model.safetensors, checkpoint/, metrics.jsonl")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch in windows (split over torchrun ranks)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 small, 1e-4 base)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps at length 128 (default steps // 10)")
    parser.add_argument("--seq-len", type=int, default=256, help="window length after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    parser.add_argument("--metrics", help="JSONL metrics file (default OUT/metrics.jsonl)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--index-cache", help="sequence index cache directory (default OUT/seqidx)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    parser.add_argument("--holdout", nargs="*", default=[], metavar="FASTA", help="held-out FASTA files: report accuracy and code usage")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    import json
    import os
    import time

    import torch

    from vqdna.train.stage1 import Stage1Config, train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Stage1Config(
        genomes=args.genomes, out=args.out, config=args.config, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, seq_len=args.seq_len, seed=args.seed, resume=args.resume,
        metrics=args.metrics, index_cache=args.index_cache, log_every=args.log_every, save_every=args.save_every, progress=not args.no_progress,
    )
    t0 = time.perf_counter()
    last = train_tokenizer(cfg)
    elapsed = time.perf_counter() - t0
    print(f"trained {args.steps} steps in {elapsed:.0f} s; last: loss {last.get('loss', float('nan')):.4f}, "
          f"recon acc {last.get('recon_acc', float('nan')):.4f}, usage {last.get('usage')}; model in {args.out}")
    import torch.distributed as dist

    if args.holdout and (not dist.is_initialized() or dist.get_rank() == 0):
        from vqdna.models.tokenizer_model import VQDNATokenizerModel
        from vqdna.train.evaluate import evaluate_genomes, format_report

        model = VQDNATokenizerModel.from_pretrained(args.out)
        report = evaluate_genomes(model, args.holdout, window=args.seq_len)
        report["tokenizer_sha256"] = model.tokenizer_sha256
        report["train_seconds"] = elapsed
        print(format_report(report))
        with open(os.path.join(args.out, "holdout.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0
