"""Step time of masked-LM pre-training from token files vs on-the-fly tokenization (issue 20).

Trains `--config` (default bert-mini) at `--batch-size` x `--window` codes (default 32 x 128) for `--steps`
timed steps after `--warmup` steps in a plain loop (forward, backward, AdamW step), fed by a DataLoader
over (a) CodeWindows of token files written by vqdna.streaming.tokenize_files and (b) GenomeWindows of
the same FASTA encoded in the loader (vqdna.train.onthefly), both with the same seeded sampler. With
`--prefetch` (pretrain's default) a vqdna.train.prefetch.Prefetcher makes the next batch in a background
thread while the step runs (`--encode-threads` CPU threads there); `--no-prefetch` with `--num-workers 0`
makes each batch when the step asks for it (serial). Also times the on-the-fly collator alone (the
encode's share of a step). Prints one line per figure and `uptime` (the machine may be loaded: the ratio
is only meaningful on an idle one).

    python bench/pretrain_onthefly.py [--fasta FILE] [--tokenizer vqdna-small] [--num-workers 0] [--no-prefetch]
"""

import argparse
import os
import subprocess
import tempfile
import time

import torch


def _epochs(loader):
    """The loader's batches, epoch after epoch (a small genome has fewer batches than the run's steps)."""
    while True:
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fasta", help="default: the bundled phage lambda genome")
    p.add_argument("--tokenizer", default="vqdna-small")
    p.add_argument("--config", default="bert-mini")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--window", type=int, default=128, help="codes per window (max_length = window + 2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (the encode runs there)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="make the next batch in a background thread while the step runs (pretrain's default)")
    p.add_argument("--encode-threads", type=int, default=None, help="CPU threads of the prefetch thread "
                   "(default: vqdna.train.prefetch.default_encode_threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vqdna.data import SequenceIndex, TokenDataset, bundled_fasta
    from vqdna.models.hf_tokenizer import VQDNATokenizer
    from vqdna.streaming import tokenize_files
    from vqdna.train.prefetch import Prefetcher
    from vqdna.train.pretrain import build_model, training_windows

    fasta = args.fasta or bundled_fasta()
    tok = VQDNATokenizer.from_pretrained(args.tokenizer)
    tmp = tempfile.mkdtemp(prefix="bench-otf-")
    tokenize_files([fasta], os.path.join(tmp, "tokens"), tok.model, device="cpu", dtype="fp32")
    sources = {"tokens": TokenDataset(os.path.join(tmp, "tokens")),
               "genomes": SequenceIndex.build([fasta], cache=os.path.join(tmp, "cache"))}
    sizes = list(tok.model.config.codebook_sizes)
    runs = {}
    for name, records in sources.items():
        data, collate = training_windows(records, tok.model, args.window, sizes, seed=0)
        model = build_model(args.config, tok.model, train_max_length=args.window + 2)
        model.train()
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                             num_workers=args.num_workers, drop_last=True,
                                             generator=torch.Generator().manual_seed(0))
        batches = _epochs(loader)
        if args.prefetch:
            batches = Prefetcher(batches, threads=args.encode_threads)
        runs[name] = dict(data=data, collate=collate, model=model, batches=batches, seconds=0.0,
                          opt=torch.optim.AdamW(model.parameters(), lr=1e-4))
    # The two runs' steps alternate, so a change of the machine's load hits both alike.
    for step in range(args.warmup + args.steps):
        for r in runs.values():
            t0 = time.perf_counter()
            loss = r["model"](**next(r["batches"])).loss
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            if step >= args.warmup:
                r["seconds"] += time.perf_counter() - t0
    times = {}
    for name, r in runs.items():
        if args.prefetch:
            r["batches"].close()
        times[name] = r["seconds"] / args.steps
        # the collator alone, in this process: what the loader (or its worker) spends per batch
        items = [r["data"][j] for j in range(args.batch_size)]
        t0 = time.perf_counter()
        for _ in range(3):
            r["collate"](items)
        collate = (time.perf_counter() - t0) / 3
        path = (f"prefetch thread ({r['batches'].threads} threads)" if args.prefetch else "serial") + \
            (f", {args.num_workers} workers" if args.num_workers else "")
        print(f"{name:8s} step {times[name] * 1e3:8.1f} ms   collate alone {collate * 1e3:8.1f} ms "
              f"({collate / times[name]:.1%} of the step)   ({len(r['data'])} windows, {args.config}, batch "
              f"{args.batch_size} x {args.window}, {path}, {torch.get_num_threads()} training threads)", flush=True)
    print(f"ratio on-the-fly / token files: {times['genomes'] / times['tokens']:.3f}  (target <= 1.15)")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
