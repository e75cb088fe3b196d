"""`vqdna pretrain`: stage-2 masked-LM pre-training on token files (--tokens) or on genomes tokenized on the
fly (--genomes, vqdna.train.onthefly)."""

from __future__ import annotations

import argparse
import os
import sys

from vqdna.commands.tokenize import os_error_message

from vqdna.train.presets import add_preset_arguments, resolve

HELP = "masked-LM pre-training (stage 2) of a VQDNA BERT on token files or on genomes tokenized on the fly"
DEFAULT_GENOME_TOKENIZER = "vqdna-small"  # `vqdna tokenize`'s default model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="token-file folder written by `vqdna tokenize`")
    source.add_argument("--genomes", nargs="+", metavar="FILE", help="FASTA/FASTQ files tokenized on the fly while "
                        "training (the same codes and windows as `vqdna tokenize` then --tokens; no token files)")
    parser.add_argument("--tokenizer", help="stage-1 tokenizer (directory or bundled name) that wrote the tokens "
                        "(default: the bundled tokenizer whose sha256 the token manifest records), or that "
                        f"tokenizes --genomes (default: {DEFAULT_GENOME_TOKENIZER})")
    parser.add_argument("--index-cache", help="with --genomes: folder of the decoded, memory-mapped sequence index "
                        "(default: OUT/sequence-index; reused while the genome files are unchanged)")
    parser.add_argument("--out", required=True, help="output folder: checkpoints, final model and tokenizer")
    add_preset_arguments(parser, "pretrain")
    parser.add_argument("--save-steps", type=int, default=1000)
    parser.add_argument("--logging-steps", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (the on-the-fly "
                        "encode then runs there, on the CPU); 0: a background thread makes the next batch while the "
                        "step runs (on a GPU the encode runs there, on a side stream)")
    parser.add_argument("--no-prefetch", action="store_true", help="with --num-workers 0: make each batch when the "
                        "step asks for it (no overlap; the same batches)")
    parser.add_argument("--encode-threads", type=int, help="CPU threads of the background batch thread "
                        "(default: a quarter of torch's, at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (loss lines every --logging-steps)")


def run(args: argparse.Namespace) -> int:
    from vqdna.models.hf_tokenizer import VQDNATokenizer
    from vqdna.train.pretrain import ResumeError, open_token_dataset, pretrain

    if args.genomes:
        from vqdna.data.fasta import FastaFormatError
        from vqdna.data.index import SequenceIndex

        try:
            records = SequenceIndex.build(args.genomes, cache=args.index_cache or os.path.join(args.out, "sequence-index"))
        except FastaFormatError as exc:  # the message `vqdna tokenize` gives for the same file
            print(f"vqdna pretrain: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"vqdna pretrain: error: {os_error_message(exc, args.out)}", file=sys.stderr)
            return 1
        tokenizer = VQDNATokenizer.from_pretrained(args.tokenizer or DEFAULT_GENOME_TOKENIZER)
    else:
        records = open_token_dataset(args.tokens)
        name = args.tokenizer or _manifest_tokenizer(records, args.tokens)
        tokenizer = VQDNATokenizer.from_pretrained(name)
        _check_identity(records, tokenizer, args.tokens)
    recipe = resolve("pretrain", args)
    if args.no_progress:  # also transformers' own bars (loading and writing weights)
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    warmup = int(recipe.warmup_steps) if recipe.warmup_steps >= 1 else recipe.warmup_steps
    print(f"pretrain: preset {args.preset}: {recipe}", flush=True)
    try:
        trainer = pretrain(records, tokenizer, args.out, config=recipe.config, steps=recipe.steps,
                           batch_size=recipe.batch_size, max_length=recipe.max_length, lr=recipe.lr,
                           min_lr=recipe.min_lr, warmup_steps=warmup, mlm_probability=recipe.mlm_probability,
                           seed=args.seed, resume=not args.no_resume, logging_steps=args.logging_steps,
                           save_steps=args.save_steps, num_workers=args.num_workers,
                           model_overrides={"classifier_pooling": recipe.pooling},
                           extra_args={"disable_tqdm": True} if args.no_progress else None,
                           prefetch=not args.no_prefetch, encode_threads=args.encode_threads)
    except ResumeError as exc:
        print(f"vqdna pretrain: error: {exc}", file=sys.stderr)
        return 1
    print("pretrain: batches: " + ", ".join(f"{k} {v}" for k, v in trainer.data_path.items()), flush=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        print(f"pretrain: {trainer.state.global_step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model in {args.out}")
    return 0


def _manifest_sha(records) -> str | None:
    manifest = getattr(records, "manifest", None) or {}
    return (manifest.get("tokenizer") or {}).get("sha256")


def _manifest_tokenizer(records, tokens_dir) -> str:
    """The bundled tokenizer whose weights' sha256 the manifest records (token files name no path)."""
    from vqdna.train.pretrain import bundled_tokenizer_with

    want = _manifest_sha(records)
    name = bundled_tokenizer_with(want)
    if name:
        return name
    raise SystemExit(f"vqdna pretrain: the tokens in {tokens_dir} were not written by a bundled tokenizer "
                     f"(sha256 {want}); pass --tokenizer DIR")


def _check_identity(records, tokenizer, tokens_dir) -> None:
    want = _manifest_sha(records)
    if want and want != tokenizer.tokenizer_sha256:
        raise SystemExit(f"vqdna pretrain: {tokens_dir} was written by tokenizer sha256 {want}, "
                         f"not by the given one ({tokenizer.tokenizer_sha256})")
