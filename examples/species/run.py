"""Species classification of 200-bp windows of five bacterial genomes, end to end on a CPU:
stage-1 tokenizer -> stage-2 masked-LM pre-training -> stage-3 LoRA fine-tuning, beside a 6-mer frequency +
logistic regression baseline on the same split (the library's, vqdna.train.baseline: strength chosen on dev).

Split (no test window shares a strain or genome region with training):
  H. pylori, S. aureus: train/dev windows from one strain (G27, COL), test windows from the other (SJM180, N315).
  E. coli, V. cholerae, K. pneumoniae (one strain each here; the MG1655 contigs are the same strain):
  every record is cut at 70% / 80% of its length: train / dev / test regions.

    .venv/bin/python examples/species/run.py --genomes DIR --out OUT [--tokenizer DIR|vqdna-small|train]

DIR holds the genome files named in SPECIES below (docs/data.md: where to fetch them, their checksums).

Stage 1 defaults to the bundled vqdna-small tokenizer, which `make tokenizer` trained on these genomes with
the same two strains held out; `--tokenizer train` trains a new one first (`vqdna train-tokenizer`,
--tokenizer-steps). Fine-tuning starts from a linear-probe head (LP-FT, `vqdna finetune --head-init`).
Prints the test MCC of both models (and of the probe head alone) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

# species -> (train strain file, held-out strain file or None for a positional hold-out)
SPECIES = {
    "E. coli": ("ecoli_MG1655.fasta.gz", None),
    "H. pylori": ("hpylori_G27.fasta.gz", "hpylori_SJM180.fasta.gz"),
    "S. aureus": ("saureus_COL.fasta.gz", "saureus_N315.fasta.gz"),
    "V. cholerae": ("vcholerae_O395.fasta.gz", None),
    "K. pneumoniae": ("kpneumoniae_HS11286.fna.xz", None),
}
BASES = np.array(list("ACGTN"))


def regions(genomes: str):
    """species -> {"train": [ids arrays], "dev": [...], "test": [...]} (uint8 base ids)."""
    from vqdna.data import read_fasta

    out = {}
    for species, (train_file, test_file) in SPECIES.items():
        recs = [r.ids for r in read_fasta(os.path.join(genomes, train_file))]
        if test_file:
            parts = {"train": [r[: int(0.875 * len(r))] for r in recs], "dev": [r[int(0.875 * len(r)) :] for r in recs],
                     "test": [r.ids for r in read_fasta(os.path.join(genomes, test_file))]}
        else:
            parts = {"train": [r[: int(0.7 * len(r))] for r in recs],
                     "dev": [r[int(0.7 * len(r)) : int(0.8 * len(r))] for r in recs],
                     "test": [r[int(0.8 * len(r)) :] for r in recs]}
        out[species] = parts
    return out


def sample_windows(arrays, count: int, length: int, rng) -> list[str]:
    """`count` windows of `length` bases without N, starts uniform over the arrays' positions."""
    arrays = [a for a in arrays if len(a) >= length]
    weights = np.array([len(a) - length + 1 for a in arrays], dtype=np.float64)
    out = []
    while len(out) < count:
        a = arrays[rng.choice(len(arrays), p=weights / weights.sum())]
        s = int(rng.integers(0, len(a) - length + 1))
        w = a[s : s + length]
        if (w < 4).all():
            out.append("".join(BASES[w]))
    return out


def draw_task(parts, names, args, rng, task: str) -> dict:
    """Writes task/{train,dev,test}.csv (GUE format); returns split -> (sequences, labels)."""
    data = {}
    os.makedirs(task, exist_ok=True)
    for split, n in (("train", args.train_windows), ("dev", args.eval_windows), ("test", args.eval_windows)):
        seqs, labels = [], []
        for y, s in enumerate(names):
            w = sample_windows(parts[s][split], n, args.window, rng)
            seqs += w
            labels += [y] * len(w)
        data[split] = (seqs, np.array(labels))
        with open(os.path.join(task, f"{split}.csv"), "w") as f:
            f.write("sequence,label\n" + "".join(f"{q},{v}\n" for q, v in zip(seqs, labels)))
    return data


def pretrain_chunks(parts, names, args, rng) -> list[str]:
    """1 kb chunks of the training regions (no labels), args.pretrain_bases per species."""
    return list(itertools.chain.from_iterable(
        sample_windows(parts[s]["train"], args.pretrain_bases // 1000, 1000, rng) for s in names))


def prepare(args) -> int:
    """--prepare-only: the draws of a full run, written for the CLI."""
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    parts = regions(args.genomes)
    names = list(SPECIES)
    chunks = pretrain_chunks(parts, names, args, rng)
    with open(os.path.join(args.out, "pretrain.fa"), "w") as f:
        f.write("".join(f">chunk{i}\n{c}\n" for i, c in enumerate(chunks)))
    data = draw_task(parts, names, args, rng, os.path.join(args.out, "task"))
    print(f"{len(chunks) * 1000:,} pre-training bases in {args.out}/pretrain.fa; task windows "
          f"{ {k: len(v[0]) for k, v in data.items()} } in {args.out}/task")
    return 0


def main() -> int:
    from vqdna.models.bert import POOLINGS, STRANDS
    from vqdna.train.presets import FINETUNE_PRESETS, PRETRAIN_PRESETS

    PRE, FT = PRETRAIN_PRESETS["small"], FINETUNE_PRESETS["small"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--genomes", required=True, metavar="DIR",
                   help="folder holding the genome files of SPECIES (docs/data.md)")
    p.add_argument("--tokenizer", default="vqdna-small",
                   help="stage-1 tokenizer: a directory, a bundled name, or 'train' to train one here")
    p.add_argument("--tokenizer-steps", type=int, default=300)
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--train-windows", type=int, default=1000, help="per species")
    p.add_argument("--eval-windows", type=int, default=300, help="dev and test windows per species")
    p.add_argument("--pretrain-bases", type=int, default=1_000_000, help="pre-training bases per species (train regions)")
    # defaults: the library's `small` presets (vqdna/train/presets.py), the recipe `--preset small` runs
    p.add_argument("--pretrain-steps", type=int, default=PRE.steps)
    p.add_argument("--max-length", type=int, default=PRE.max_length, help="pre-training window in tokens")
    p.add_argument("--config", default=PRE.config)
    p.add_argument("--pooling", default=FT.pooling, choices=POOLINGS,
                   help="classifier input: the CLS token, the last layer's mean over the window's tokens, "
                        "those means of every layer, concatenated, or the mean of a wide ReLU layer on those states")
    p.add_argument("--token-window", type=int, default=FT.window,
                   help="with mean_wide: consecutive tokens the wide layer reads (vqdna finetune --window)")
    p.add_argument("--strands", default=FT.strands, choices=STRANDS,
                   help="the head reads each window (forward) or the mean over it and its reverse complement (both); "
                        "the 6-mer baseline counts the same strands")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in FT.lrs))
    p.add_argument("--lora-dropout", type=float, default=FT.lora_dropout)
    p.add_argument("--epochs", type=int, default=FT.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare-only", action="store_true",
                   help="only draw the data: OUT/pretrain.fa (the pre-training chunks) and OUT/task/{train,dev,test}.csv, "
                        "for the CLI (examples/small_preset.sh); the same draws as a full run with this --seed")
    args = p.parse_args()
    if args.prepare_only:
        return prepare(args)

    import torch

    from vqdna.models.hf_tokenizer import VQDNATokenizer
    from vqdna.train.finetune import finetune
    from vqdna.train.pretrain import pretrain

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    parts = regions(args.genomes)
    names = list(SPECIES)

    # 1. stage-1 tokenizer
    tok_dir = args.tokenizer
    if tok_dir == "train":
        tok_dir = os.path.join(args.out, "tokenizer")
        train_files = [os.path.join(args.genomes, f) for f, _ in SPECIES.values()]
        subprocess.run([sys.executable, "-m", "vqdna.cli", "train-tokenizer", "--genomes", *train_files, "--config",
                        "vqdna-small", "--steps", str(args.tokenizer_steps), "--out", tok_dir, "--no-progress",
                        "--log-every", "50"], check=True)
    tok = VQDNATokenizer.from_pretrained(tok_dir, model_max_length=256)
    print(f"[{time.time() - t0:6.0f} s] tokenizer {tok_dir} (levels {tok.codebook_sizes})", flush=True)

    # 2. masked-LM pre-training on the training regions only (1 kb chunks, no labels)
    chunks = pretrain_chunks(parts, names, args, rng)
    records = [(f"chunk{i}", c.numpy().astype(np.uint16)) for i, c in enumerate(tok.encode_codes(chunks))]
    mlm_dir = os.path.join(args.out, "mlm")
    trainer = pretrain(records, tok, mlm_dir, config=args.config, steps=args.pretrain_steps, batch_size=PRE.batch_size,
                       max_length=args.max_length, lr=PRE.lr, warmup_steps=PRE.warmup_steps,
                       logging_steps=max(1, min(50, args.pretrain_steps // 5)), save_steps=args.pretrain_steps,
                       seed=args.seed, model_overrides={"classifier_pooling": args.pooling},
                       extra_args={"disable_tqdm": True})
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loss = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "already done (resumed)"
    print(f"[{time.time() - t0:6.0f} s] pre-trained {args.config} {args.pretrain_steps} steps on "
          f"{len(chunks) * 1000:,} bases: {loss}", flush=True)

    # 3. the classification task, GUE format
    task = os.path.join(args.out, "task")
    data = draw_task(parts, names, args, rng, task)

    # 4. LoRA fine-tuning
    torch.manual_seed(args.seed)
    res = finetune(task, mlm_dir, os.path.join(args.out, "finetune"), lrs=[float(x) for x in args.lrs.split(",")],
                   epochs=args.epochs, batch_size=FT.batch_size, seeds=(args.seed,), tokenizer=tok,
                   lora_dropout=args.lora_dropout, pooling=args.pooling, strands=args.strands,
                   window=args.token_window, baseline_k=6)
    base = res["baseline"]["test"]
    mcc = res["test"]["mcc"]["mean"]
    print(f"[{time.time() - t0:6.0f} s] linear-probe head alone (before fine-tuning): test MCC "
          f"{res['probe']['test']['mcc']:.4f}", flush=True)
    chosen = res["chosen"][0]
    how = "the probe head (epoch 0)" if chosen["source"] == "probe" else f"lr {chosen['lr']:g}, epoch {chosen['best_epoch']}"
    print(f"[{time.time() - t0:6.0f} s] VQDNA {args.config} + LoRA: test MCC {mcc:.4f} ({how}, chosen on dev)")
    summary = {"species": names, "windows": {k: len(v[0]) for k, v in data.items()}, "baseline_6mer_lr": base,
               "vqdna": {k: v["mean"] for k, v in res["test"].items()}, "probe_head": res["probe"]["test"],
               "args": vars(args),
               "seconds": time.time() - t0}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"test MCC: VQDNA {mcc:.4f} vs 6-mer baseline {base['mcc']:.4f}; {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
