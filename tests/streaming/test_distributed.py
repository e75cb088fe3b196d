"""vqdna.streaming.distributed: 2 or 3 ranks (forked gloo ranks, and torchrun) write the bytes one process
writes, only rank 0 plans, and each rank reads only its own units."""

import json
import subprocess
import sys

import pytest
import torch

from tests.streaming._fixtures import ONE_THREAD_ENV, LENGTHS, dir_bytes, model, model_dir, one_thread, random_fasta  # noqa: F401 (fixtures)
from vqdna.data import TokenDataset
from vqdna.streaming import tokenize_files
from vqdna.streaming.settings import DEFAULT_SHARD_RECORDS


def _rank_main(rank, world, init_file, inputs, out, model_dir):
    import torch.distributed as dist

    from vqdna.models import VQDNATokenizerModel
    from vqdna.streaming import run as run_mod, units as units_mod

    # Count what this rank plans and which units it reads (the ranks are forked: patch here).
    seen = {"plans": 0, "units": []}
    real_plan, real_unit = units_mod.plan_units, units_mod._byte_unit

    def plan(*args, **kw):
        seen["plans"] += 1
        return real_plan(*args, **kw)

    def unit(*args):
        seen["units"].append(args[-1])
        return real_unit(*args)

    run_mod.plan_units, units_mod._byte_unit = plan, unit
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = VQDNATokenizerModel.from_pretrained(model_dir)
        tokenize_files(inputs, out, model, window=40, batch_size=4, shard_bases=250)
        dist.barrier()  # as the CLI does: no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    with open(f"{init_file}.rank{rank}.json", "w") as f:
        json.dump(seen, f)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one(tmp_path, model_dir, world):
    """2 or 3 gloo ranks write the same bytes as one process (a plain and a gzip input); only rank 0
    plans (the plain file from its size and first MiB), and each rank reads only its own units of
    the plain file (issue 22: planning is not O(bases) per rank)."""
    from vqdna.models import VQDNATokenizerModel
    from vqdna.streaming.units import plan_units

    inputs = [random_fasta(tmp_path / "in.fa"), random_fasta(tmp_path / "in2.fa.gz", LENGTHS[::-1], seed=1, gz=True)]
    one = str(tmp_path / "one")
    tokenize_files(inputs, one, VQDNATokenizerModel.from_pretrained(model_dir), window=40, batch_size=4, shard_bases=250)
    many = str(tmp_path / "many")
    # fork: the ranks inherit the imported modules (spawn would re-import torch and transformers in
    # each); they run single-threaded, so no OpenMP pool is used across the fork.
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, str(tmp_path / "init"), inputs, many, model_dir), nprocs=world, join=True, start_method="fork"
    )
    assert len(TokenDataset(one).manifest["shards"]) >= 8
    assert dir_bytes(one) == dir_bytes(many)
    seen = [json.loads((tmp_path / f"init.rank{r}.json").read_text()) for r in range(world)]
    assert [s["plans"] for s in seen] == [1] + [0] * (world - 1)
    plain = plan_units(inputs, 250, DEFAULT_SHARD_RECORDS).files[0].units
    assert [s["units"] for s in seen] == [list(range(r, plain, world)) for r in range(world)]


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(tmp_path, model_dir):
    """`torchrun --nproc_per_node 2 -m vqdna.cli tokenize` (gloo on CPU) writes the same bytes as one process."""
    fasta = random_fasta(tmp_path / "in.fa")
    args = ["-m", "vqdna.cli", "tokenize", fasta, "--model", model_dir, "--window", "40", "--shard-bases", "250",
            "--device", "cpu", "--no-progress"]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=ONE_THREAD_ENV)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("vqdna tokenize: ") == 1  # only rank 0 prints the summary
    assert dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "two")
