"""On-the-fly tokenization (vqdna.train.onthefly): the codes of every window drawn from raw sequences
equal what `vqdna tokenize` wrote for the same bases (record ends, N runs, short and empty records),
and the windows are laid out exactly as CodeWindows lays them out over the token files, so a seeded
sampler draws the same code windows from either."""

import copy

import numpy as np
import pytest
import torch

from tests.streaming._fixtures import LENGTHS, check_near_ties, one_thread, tiny_model  # noqa: F401 (fixture)
from vqdna.data import SequenceIndex, TokenDataset
from vqdna.streaming import tokenize_files
from vqdna.train.onthefly import GenomeWindows, OnTheFlyEncoder, OnTheFlyMLMCollator
from vqdna.train.pretrain import CodeWindows

# LENGTHS (empty, shorter than the halo, window +- 1, longer than a shard) plus a record that is mostly
# one N run, one that ends in an N run and one that is only N.
N_RUNS = [("nrun", "ACGT" * 10 + "N" * 150 + "GATTACA" * 5), ("ntail", "ACGTTGCA" * 12 + "n" * 70), ("allN", "N" * 40)]


def _fasta(path):
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGTACGTACGTNacgtRY", np.uint8)
    recs = [(f"r{i}", letters[rng.integers(0, len(letters), n)].tobytes().decode()) for i, n in enumerate(LENGTHS)]
    recs[3:3] = N_RUNS
    with open(path, "w") as f:
        for name, seq in recs:
            f.write(f">{name}\n" + "".join(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60)))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(model, SequenceIndex, TokenDataset) of one FASTA tokenized by tokenize_files (window 100,
    shards of 500 bases: windows of the trainer fall across the tokenizer's windows and shards)."""
    tmp = tmp_path_factory.mktemp("otf")
    fasta = _fasta(tmp / "in.fa")
    model = tiny_model()
    tokenize_files([fasta], str(tmp / "tokens"), model, window=100, shard_bases=500, device="cpu", dtype="fp32")
    return model, SequenceIndex.build([fasta], cache=str(tmp / "cache")), TokenDataset(str(tmp / "tokens"))


def _assert_codes_equal(model, index, tokens, window, device="cpu", dtype=None, tol=None):
    """Encodes every window of GenomeWindows(index) as pretrain() does (batches of 16 made by the prefetch
    thread, on `device` in `dtype`) and compares them with the token files' codes, record by record:
    equal but for near-ties (within tol), of which at most 3 (more would be a halo or padding bug)."""
    from vqdna.train.prefetch import Prefetcher

    fly = GenomeWindows(index, window, halo=model.receptive_radius)
    files = CodeWindows(tokens, window)
    assert np.array_equal(fly.index, files.index)  # same windows under the same numbers
    encode = OnTheFlyEncoder(model, device, dtype)
    batches = [range(j0, min(j0 + 16, len(fly))) for j0 in range(0, len(fly), 16)]  # padding must not leak in
    got = {}
    for js, codes in zip(batches, Prefetcher((encode([fly[j] for j in js]) for js in batches), device=device)):
        got.update(zip(js, codes))
    assert set(encode.threads) == {"vqdna-prefetch"}
    differing = 0
    cpu_model = copy.deepcopy(model).cpu()  # the near-tie check recomputes the features on the CPU
    for i in range(len(index)):
        js = np.flatnonzero(fly.index[:, 0] == i)
        want = tokens[i][1].astype(np.int64)
        have = torch.cat([got[j] for j in js]).numpy() if len(js) else np.zeros((0, want.shape[1]), np.int64)
        assert have.shape == want.shape, index.records[i].name
        for j in js:  # each window against the token files' window, as the trainer sees them
            assert got[j].shape == files[j].shape
        if not np.array_equal(have, want):
            kw = {"tol": tol} if tol is not None else {}
            differing += check_near_ties(cpu_model, np.asarray(index.sequence(i)), have, want, **kw)
    assert differing <= 3  # near-ties, counted; more would be a halo or padding bug hidden by the tolerance
    return differing


@pytest.mark.parametrize("window", [7, 62])
def test_codes_equal_token_files(corpus, window):
    model, index, tokens = corpus
    _assert_codes_equal(model, index, tokens, window)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("window", [7, 62])
def test_codes_equal_token_files_cuda(tmp_path, window, dtype):
    """On a GPU: the token files `vqdna tokenize --device cuda --dtype D` writes equal the codes the trainer
    encodes on the GPU in D (the prefetch thread's side stream), near-ties aside. bf16 ties are wider:
    both sides round the features to bf16 (8 bits of mantissa), so a near-tie is within 2**-8 of the scale."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    fasta = _fasta(tmp_path / "in.fa")
    model = tiny_model()
    tokenize_files([fasta], str(tmp_path / "tokens"), model, window=100, shard_bases=500, device="cuda", dtype=dtype)
    index = SequenceIndex.build([fasta], cache=str(tmp_path / "cache"))
    differing = _assert_codes_equal(model, index, TokenDataset(str(tmp_path / "tokens")), window, "cuda", dtype,
                                    tol=2.0**-8 if dtype == "bf16" else None)
    print(f"cuda {dtype} window {window}: {differing} near-tie positions differ")


def test_halo_matters(corpus):
    """Without the halo the window edges see a record end that is not there: codes differ (the test
    above would catch a halo bug)."""
    model, index, tokens = corpus
    fly = GenomeWindows(index, 62, halo=0)
    encode = OnTheFlyEncoder(model)
    j = int(np.flatnonzero(fly.index[:, 1] == 62)[0])  # a window inside a long record
    assert not np.array_equal(encode([fly[j]])[0].numpy(), CodeWindows(tokens, 62)[j].numpy())


def test_same_seed_same_windows(corpus):
    """The Trainer's sampler (RandomSampler seeded by the run's seed) over either dataset draws the same
    code windows, and the collators build the same batch from them."""
    model, index, tokens = corpus
    fly, files = GenomeWindows(index, 62, halo=model.receptive_radius), CodeWindows(tokens, 62)
    order = [list(torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(5))) for ds in (fly, files)]
    assert order[0] == order[1]
    sizes = model.config.codebook_sizes
    from vqdna.train.pretrain import MLMCollator

    js = order[0][:8]
    torch.manual_seed(3)
    a = OnTheFlyMLMCollator(model, sizes)([fly[j] for j in js])
    torch.manual_seed(3)
    b = MLMCollator(sizes)([files[j] for j in js])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stale_index_refused(tmp_path):
    """Genome windows (and so pretrain()) refuse an index whose genome file changed after decoding: the
    windows would be of a sequence that no longer exists. The error names the index and the file."""
    from tests.train import _mlm
    from vqdna.data import StaleIndexError
    from vqdna.train.pretrain import pretrain

    fasta = _fasta(tmp_path / "in.fa")
    index = SequenceIndex.build([fasta], cache=str(tmp_path / "cache"))
    GenomeWindows(index, 30, halo=4)
    with open(fasta, "a") as f:
        f.write(">extra\nACGT\n")
    with pytest.raises(StaleIndexError, match=f"{index.directory} is stale.*{tmp_path / 'in.fa'}: size"):
        GenomeWindows(index, 30, halo=4)
    with pytest.raises(StaleIndexError):
        pretrain(index, _mlm.tokenizer(), str(tmp_path / "out"), config="bert-tiny", steps=1, batch_size=2, max_length=32)
    assert not (tmp_path / "out").exists()


def _train(records, out, steps=4, **kw):
    from tests.train import _mlm
    from vqdna.train.pretrain import pretrain

    return pretrain(records, _mlm.tokenizer(), str(out), config="bert-tiny", steps=steps, batch_size=8, max_length=32,
                    lr=2e-3, warmup_steps=1, logging_steps=1, save_steps=2, extra_args={"disable_tqdm": True}, **kw)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def mlm_corpus(tmp_path_factory):
    """(SequenceIndex, TokenDataset) of the test FASTA tokenized with the stage-2 tests' saved tokenizer."""
    from tests.train import _mlm

    tmp = tmp_path_factory.mktemp("otf-mlm")
    fasta = _fasta(tmp / "in.fa")
    tokenize_files([fasta], str(tmp / "tokens"), _mlm.tokenizer().model, window=100, device="cpu", dtype="fp32")
    return fasta, SequenceIndex.build([fasta], cache=str(tmp / "cache")), TokenDataset(str(tmp / "tokens"))


def _encoded_by_prefetch_thread(trainer):
    """The run's on-the-fly encodes all ran in the prefetch thread (ahead of the step), and it made batches."""
    assert trainer.data_path["overlap"] == "prefetch thread" and trainer.data_path["encode_dtype"] == "fp32"
    assert set(trainer.data_collator.encoder.threads) == {"vqdna-prefetch"}
    assert trainer.prefetchers and all(p.produced > 0 for p in trainer.prefetchers)


def test_pretrain_genomes_equals_tokens_and_resumes(mlm_corpus, tmp_path):
    """pretrain() on raw genomes (encoded by the prefetch thread, the default) and on their token files
    (batches made serially when the step asks, prefetch=False), same seed: the same windows and codes, so
    the same losses and weights, bit for bit; a run resumed from the step-2 checkpoint ends bit-identical."""
    import json
    import shutil

    _, index, tokens = mlm_corpus
    from_tokens = _train(tokens, tmp_path / "tokens-run", prefetch=False)
    from_genomes = _train(index, tmp_path / "genomes-run")
    assert from_tokens.data_path == {"overlap": "none"} and not hasattr(from_tokens, "prefetchers")
    _encoded_by_prefetch_thread(from_genomes)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (from_tokens, from_genomes)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    final = _weights(from_genomes)
    assert all(torch.equal(final[k], v) for k, v in _weights(from_tokens).items())
    data = json.loads((tmp_path / "genomes-run" / "training_data.json").read_text())
    assert data["source"] == "genomes" and data["inputs"][0]["sha256_ends"] and data["window"] == 30
    assert data["tokenizer"]["sha256"] == _mlm_sha()
    assert data["data_path"] == {"overlap": "prefetch thread", "threads": 1, "encode_device": "cpu", "encode_dtype": "fp32"}
    assert json.loads((tmp_path / "tokens-run" / "training_data.json").read_text())["source"] == "tokens"
    # resume: only the step-2 checkpoint in a fresh folder; the run continues to step 4
    shutil.copytree(tmp_path / "genomes-run" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = _train(index, tmp_path / "resumed")
    _encoded_by_prefetch_thread(resumed)
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-2:] == losses[1][-2:]
    assert all(torch.equal(final[k], v) for k, v in _weights(resumed).items())


@pytest.mark.cuda
def test_pretrain_genomes_cuda_encodes_on_the_side_stream(mlm_corpus, tmp_path):
    """On a GPU pretrain() encodes on it, in bf16 (`vqdna tokenize`'s default there), in the prefetch
    thread (whose batches reach the step through a side stream and an event), and trains."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    trainer = _train(mlm_corpus[1], tmp_path / "run", steps=2)
    assert trainer.data_path == {"overlap": "prefetch thread", "threads": None, "encode_device": "cuda:0",
                                 "encode_dtype": "bf16"}
    assert set(trainer.data_collator.encoder.threads) == {"vqdna-prefetch"}
    assert all(p.stream is not None and p.produced > 0 for p in trainer.prefetchers)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def _mlm_sha():
    from tests.train import _mlm

    return _mlm.tokenizer().tokenizer_sha256


def test_cli_pretrain_genomes(mlm_corpus, tmp_path, capsys):
    """`vqdna pretrain --genomes`: trains and saves; --tokens and --genomes exclude each other; a malformed
    genome gives `vqdna tokenize`'s error (file, record, line)."""
    from tests.train import _mlm
    from vqdna.cli import main

    fasta = mlm_corpus[0]
    argv = ["pretrain", "--genomes", fasta, "--tokenizer", f"{_mlm.ROOT}/stage1", "--config", "bert-tiny", "--out",
            str(tmp_path / "mlm"), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--warmup-steps", "1",
            "--save-steps", "2", "--logging-steps", "1", "--no-progress"]
    assert main(argv) == 0
    assert "pretrain: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "mlm" / "training_data.json").exists() and (tmp_path / "mlm" / "sequence-index").is_dir()
    with pytest.raises(SystemExit):
        main(argv[:3] + ["--tokens", str(tmp_path)] + argv[3:])
    capsys.readouterr()
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nACGT\n>broken\nACGT\nAC!GT\n")
    assert main(["tokenize", str(bad), "--out", str(tmp_path / "tok"), "--model", f"{_mlm.ROOT}/stage1", "--no-progress"]) == 1
    want = capsys.readouterr().err.split("vqdna tokenize: error: ", 1)[1]
    assert main(argv[:2] + [str(bad)] + argv[3:]) == 1
    got = capsys.readouterr().err.split("vqdna pretrain: error: ", 1)[1]
    assert got == want and "broken" in got and str(bad) in got
    # resuming the run (checkpoint-2 in --out) with another tokenizer is refused, naming both
    other = tiny_model(seed=1)
    other.save_pretrained(str(tmp_path / "other"))
    argv[argv.index("--tokenizer") + 1] = str(tmp_path / "other")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {tmp_path / 'mlm' / 'checkpoint-2'}: the run started with tokenizer sha256 {_mlm_sha()}" in err
    assert f"the given tokenizer is sha256 {other.tokenizer_sha256} ({tmp_path / 'other'})" in err
    assert main(argv + ["--no-resume"]) == 0  # starting afresh with it is fine


@pytest.mark.slow
def test_two_gloo_ranks_draw_disjoint_reproducible_windows(tmp_path):
    """torchrun, 2 CPU ranks (gloo), on-the-fly pre-training: each rank encodes its own half of every global
    batch (disjoint windows), and a second run with the same seed encodes the same windows on each rank."""
    import json
    import os
    import subprocess
    import sys

    from vqdna.data import bundled_fasta

    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tests/train/_ranks_onthefly.py", bundled_fasta(), str(out)]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([json.loads((out / f"windows-{r}.json").read_text()) for r in (0, 1)])
    a, b = runs
    assert len(a[0]) >= 8 and len(a[1]) >= 8  # 2 steps x 4 windows per rank (the loader may collate ahead)
    # reproducible from the seed, per rank: the 8 windows trained on (how many more the prefetch thread
    # encoded before the run ended depends on timing)
    assert [seen[:8] for seen in a] == [seen[:8] for seen in b]
    assert not set(a[0]) & set(a[1])  # disjoint
