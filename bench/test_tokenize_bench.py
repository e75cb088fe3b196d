"""End-to-end streaming tokenization (`vqdna tokenize` / vqdna.streaming.tokenize_files): FASTA on disk
-> token files on disk, in bases per second, with the busy time of the reading, compute and writing
stages (they overlap). CPU: vqdna-small (the bundled tokenizer when present, else random weights of
that configuration), float32, native kernels. GPU (`cuda` marker): vqdna-base with random weights
(throughput does not depend on the weights), bf16, against the docs/design.md §4 limit of the device:
measured bf16 matmul peak / 14.7 MFLOP per base (about 54 M bases/s on an H100)."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from bench.conftest import bench_size, matmul_peak_gflops, record, require_device, time_call
from bench.fasta import write_fasta as _write_fasta

# Bases per run by --vqdna-size: the CPU runs ~0.1-1 M bases/s with vqdna-small on 2 cores.
CPU_BASES = {"tiny": 200_000, "small": 2_000_000, "full": 8_000_000}
GPU_BASES = {"tiny": 20_000_000, "small": 200_000_000, "full": 1_000_000_000}
BASE_FLOP_PER_BASE = 14.7e6  # docs/design.md §4: the paper-size HRQ tokenizer (6 blocks x 16 D^2 + lookups)


def _model(name: str, device: str):
    from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel
    from vqdna.models.tokenizer_model import bundled_tokenizers

    if name in bundled_tokenizers():
        return VQDNATokenizerModel.from_pretrained(name), "bundled"
    torch.manual_seed(0)
    return VQDNATokenizerModel(VQDNATokenizerConfig.named(name)).eval(), "random weights"


def _run(benchmark, tmp_path, fasta, model, device, dtype, window, batch_size, rounds):
    from vqdna.streaming import tokenize_files

    out = tmp_path / "tokens"
    last = {}

    def once():
        shutil.rmtree(out, ignore_errors=True)
        cpu0 = time.process_time()
        last["stats"] = tokenize_files([str(fasta)], str(out), model, window=window, batch_size=batch_size, device=device, dtype=dtype)
        # CPU seconds of the whole process: on a shared machine wall time also counts waiting for a core.
        last["cpu_s"] = min(last.get("cpu_s", float("inf")), time.process_time() - cpu0)

    seconds = time_call(benchmark, once, device, rounds=rounds)
    last["stats"].process_cpu_s = last["cpu_s"]
    return seconds, last["stats"]


@pytest.mark.cpu
@pytest.mark.parametrize("record_bases", [1_000_000, 2_000], ids=["long-records", "short-records"])
def test_tokenize_cpu(benchmark, tmp_path, request, record_bases):
    n_bases = CPU_BASES[bench_size(request.config)]
    fasta = tmp_path / "in.fa"
    _write_fasta(fasta, n_bases, record_bases)
    model, weights = _model("vqdna-small", "cpu")
    benchmark.group = "tokenize"
    seconds, stats = _run(benchmark, tmp_path, fasta, model, "cpu", "fp32", 8192, 8, rounds=2)
    split = {"read_s": round(stats.read_s, 3), "compute_s": round(stats.compute_s, 3), "write_s": round(stats.write_s, 3),
             "process_cpu_s": round(stats.process_cpu_s, 3), "threads": torch.get_num_threads()}
    record("tokenize", f"vqdna-small ({weights})", "cpu", "float32", {"bases": n_bases, "record": record_bases}, seconds,
           bases=n_bases, table=split)
    print(f"\ntokenize cpu vqdna-small, records of {record_bases:,}: {n_bases / seconds / 1e6:.3f} M bases/s; "
          f"busy s: read {stats.read_s:.2f}, compute {stats.compute_s:.2f}, write {stats.write_s:.2f} (wall {seconds:.2f}, "
          f"process CPU {stats.process_cpu_s:.2f} s on {torch.get_num_threads()} threads)")


@pytest.mark.cuda
def test_tokenize_gpu_base(benchmark, tmp_path, request):
    require_device("cuda")
    n_bases = GPU_BASES[bench_size(request.config)]
    fasta = tmp_path / "in.fa"
    _write_fasta(fasta, n_bases, 50_000_000)
    model, weights = _model("vqdna-base", "cuda")
    benchmark.group = "tokenize"
    seconds, stats = _run(benchmark, tmp_path, fasta, model, "cuda", "bf16", 8192, 64, rounds=1)
    limit = matmul_peak_gflops("cuda", torch.bfloat16) * 1e9 / BASE_FLOP_PER_BASE
    rate = n_bases / seconds
    split = {"read_s": round(stats.read_s, 3), "compute_s": round(stats.compute_s, 3), "write_s": round(stats.write_s, 3),
             "limit_bases_per_s": round(limit), "fraction_of_limit": round(rate / limit, 4)}
    record("tokenize", f"vqdna-base ({weights})", "cuda", "bfloat16", {"bases": n_bases}, seconds, bases=n_bases, table=split)
    print(f"\ntokenize cuda vqdna-base bf16: {rate / 1e6:.2f} M bases/s = {100 * rate / limit:.1f}% of the "
          f"{limit / 1e6:.1f} M bases/s limit; busy s: read {stats.read_s:.2f}, compute {stats.compute_s:.2f}, write {stats.write_s:.2f}")
