"""`vqdna demo`: tokenize the bundled genome with the bundled tokenizer (when shipped) and print the
summary; then nearest-code lookup on the same genome, every backend, timed. No network."""

from __future__ import annotations

import argparse
import os
import time

HELP = "tokenize the bundled genome with the bundled tokenizer; nearest-code lookup on every backend, timed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fasta", help="FASTA file (default: the bundled phage lambda genome)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--codebook-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="vqdna-small", help="bundled tokenizer name or directory (default: vqdna-small)")
    parser.add_argument("--skip-backends", action="store_true", help="only the tokenization part")


def _tokenize(path: str, model_name: str) -> None:
    """Streaming tokenization of `path` into a temporary token directory, then its summary."""
    import os
    import tempfile

    from vqdna.commands.tokenize import format_summary
    from vqdna.data import TokenDataset
    from vqdna.models import VQDNATokenizerModel
    from vqdna.streaming import tokenize_files

    model = VQDNATokenizerModel.from_pretrained(model_name)
    with tempfile.TemporaryDirectory(prefix="vqdna-demo-") as out:
        stats = tokenize_files([path], out, model, device="cpu", dtype="fp32")
        ds = TokenDataset(out)
        name, codes = ds[0]
        print(f"vqdna demo: tokenized {path} with {model_name} (sha256 {model.tokenizer_sha256[:12]}...) "
              f"into {len(ds.manifest['shards'])} shard(s), {sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)):,} bytes")
        print(format_summary(stats))
        shown = " ".join("/".join(str(int(c)) for c in row) for row in codes[:8])
        print(f"first codes of {name} (level codes per base): {shown} ...")


def run(args: argparse.Namespace) -> int:
    """1. With the bundled tokenizer (or --model DIR): stream the genome into token files in a temporary
    directory and print the run's summary. 2. Nearest-code lookup on real sequence features: the
    genome through a seeded random stem (docs/design.md §2.5) gives one D-dim feature per base; a k-means
    codebook is fit on a sample; every base is looked up on each backend available here, timed
    against the spec."""
    import torch

    from vqdna.data import bundled_fasta, read_fasta
    from vqdna.kernels import available_backends, lookup, reference
    from vqdna.models.tokenizer_model import bundled_tokenizers

    torch.manual_seed(args.seed)
    path = args.fasta or bundled_fasta()
    if args.model in bundled_tokenizers() or os.path.isdir(args.model):
        _tokenize(path, args.model)
    else:
        print(f"vqdna demo: no tokenizer {args.model!r} here (bundled: {bundled_tokenizers()}); skipping tokenization")
    if args.skip_backends:
        return 0
    records = list(read_fasta(path))
    ids = torch.from_numpy(records[0].ids.copy())[None, :]
    n_bases = ids.shape[1]
    d, k = args.dim, args.codebook_size
    stem_weight = torch.randn(d, 5, 5) / 5**0.5
    with torch.no_grad():
        feats = reference.stem(ids, stem_weight, torch.randn(d) * 0.1, torch.ones(d), torch.zeros(d))[0]
    sample = feats[torch.randperm(n_bases)[: min(n_bases, 8 * k)]]
    t0 = time.perf_counter()
    codebook = reference.kmeans(sample, k, iters=5, init="kmeans++", seed=args.seed)
    t_kmeans = time.perf_counter() - t0
    print(f"vqdna demo: {records[0].name} ({n_bases:,} bases) from {path}")
    print(f"features [{n_bases}, {d}] float32 from a random stem; k-means codebook [{k}, {d}] in {t_kmeans:.1f} s")
    flops = 2.0 * n_bases * k * d
    ref_codes, ref_dist = lookup(feats, codebook, backend="reference")
    device = "cpu"
    print(f"{'backend':<10} {'ms':>9} {'Mvec/s':>9} {'GFLOP/s':>9} {'vs ref':>8} {'codes = ref':>12}")
    ref_ms = None
    for backend in ["reference"] + [b for b in available_backends(device) if b != "reference"]:
        lookup(feats[:1024], codebook, backend=backend)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            codes, dist = lookup(feats, codebook, backend=backend)
            best = min(best, time.perf_counter() - t0)
        ms = best * 1e3
        ref_ms = ms if backend == "reference" else ref_ms
        same = (codes == ref_codes).float().mean().item() * 100
        print(f"{backend:<10} {ms:9.1f} {n_bases / best / 1e6:9.2f} {flops / best / 1e9:9.1f} {ref_ms / ms:7.2f}x {same:11.2f}%")
    used = torch.unique(ref_codes).numel()
    counts = torch.bincount(ref_codes.long(), minlength=k).double()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    print(f"codes used: {used}/{k} ({100 * used / k:.1f}%), perplexity {perplexity:.1f}, mean squared distance {ref_dist.mean():.4f}")
    return 0
