"""The output directory of a run (vqdna.streaming.directory): every setting the manifest guards refuses a
resume that would mix shards of two configurations, names the setting, and touches nothing; the original
settings still resume to the bytes of an uninterrupted run. Before any compute, a directory that is not
ours (foreign shard-* entries, shards without a manifest, path names in the manifest, a symlinked
temporary file, format 1) is refused and left as it was; damaged shards are redone on resume.

The interrupted directory is made from a finished one by the documented layout alone (manifest not
complete, its totals dropped, later shards missing, a half-written temporary shard), so these tests
do not depend on how the writer fails."""

import json
import os
import re
import shutil

import pytest
import torch

from tests.streaming._fixtures import KW, clean, dir_bytes, model, model_dir, one_thread, random_fasta, tiny_model  # noqa: F401 (fixtures)
from vqdna.data import TokenDataset
from vqdna.streaming.token_files import MANIFEST, TMP_SUFFIX, read_manifest, shard_name, write_manifest
from vqdna.streaming import TokenizeError, tokenize_files

# The settings of the original run: several shards (the 1,301-base record spans three of them).
SETTINGS = dict(window=50, batch_size=4, shard_bases=300, shard_records=5)
KEPT_SHARDS = 2  # complete shards left by the "crash"


@pytest.fixture(scope="module")
def original(tmp_path_factory, model):
    """Two inputs, the finished run's directory and its bytes, and an interrupted copy of it."""
    root = tmp_path_factory.mktemp("resume")
    inputs = [random_fasta(root / "one.fa", seed=1), random_fasta(root / "two.fa.gz", seed=2, gz=True)]
    done = root / "done"
    tokenize_files(inputs, str(done), model, **SETTINGS)
    manifest = read_manifest(str(done))
    assert len(manifest["shards"]) > KEPT_SHARDS + 2
    crashed = root / "crashed"
    shutil.copytree(done, crashed)
    for name in os.listdir(crashed):
        if name.startswith("shard-") and int(name[6:11]) >= KEPT_SHARDS:
            os.remove(crashed / name)
    with open(crashed / (shard_name(KEPT_SHARDS) + ".bin" + TMP_SUFFIX), "wb") as f:
        f.write(b"half a shard")
    write_manifest(str(crashed), {k: v for k, v in manifest.items() if k not in ("shards", "records", "bases")}
                   | {"complete": False})
    return {"root": root, "inputs": inputs, "want": dir_bytes(done), "crashed": crashed}


def _edit_manifest(directory, key, value):
    path = os.path.join(directory, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest[key] = value
    write_manifest(str(directory), manifest)


def _other_content(root, inputs):
    # Same name and size, other bases: only the content fingerprint can tell.
    random_fasta(root / "one.fa", seed=99)
    return inputs


def _renamed(root, inputs):
    shutil.copy(inputs[1], root / "renamed.fa.gz")
    return [inputs[0], str(root / "renamed.fa.gz")]


# (what changes, how: run arguments or inputs, or a manifest written by another configuration,
#  the refusal's words). Settings the run derives from the tokenizer (levels, codebook sizes, token
# dtype, halo) or from the device (compute) are changed in the manifest: same model, other manifest.
CASES = {
    "tokenizer": (dict(model=1), r"the tokenizer changed \(sha256 \w+ in the manifest, \w+ now\)"),
    "window": (dict(window=51), r"window was 50 and is now 51"),
    "batch_size": (dict(batch_size=5), r"batch_size was 4 and is now 5"),
    "shard_bases": (dict(shard_bases=301), r"shard_bases was 300 and is now 301"),
    "shard_records": (dict(shard_records=6), r"shard_records was 5 and is now 6"),
    "inputs-fewer": (dict(inputs=lambda root, inputs: inputs[:1]), r"the inputs changed \(2 files in the manifest, 1 now\)"),
    "inputs-more": (dict(inputs=lambda root, inputs: inputs + inputs[:1]), r"the inputs changed \(2 files in the manifest, 3 now\)"),
    "inputs-order": (dict(inputs=lambda root, inputs: inputs[::-1]), r"input \S*two\.fa\.gz is not \S*one\.fa of the manifest"),
    "inputs-name": (dict(inputs=_renamed), r"input \S*renamed\.fa\.gz is not \S*two\.fa\.gz of the manifest"),
    "input-content": (dict(inputs=_other_content), r"input \S*one\.fa changed since the manifest"),
    "levels": (dict(manifest=("levels", 3)), r"levels was 3 and is now 2"),
    "codebook_sizes": (dict(manifest=("codebook_sizes", [16, 41])), r"codebook_sizes was \[16, 41\] and is now \[16, 40\]"),
    "dtype": (dict(manifest=("dtype", "uint32")), r"dtype was uint32 and is now uint16"),
    "halo": (dict(manifest=("halo", 99)), r"halo was 99 and is now \d+"),
    "compute": (dict(manifest=("compute", {"device": "cuda", "dtype": "bf16"})),
                r"compute was \{'device': 'cuda', 'dtype': 'bf16'\} and is now \{'device': 'cpu', 'dtype': 'fp32'\}"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_changed_setting_is_refused_by_name_and_changes_nothing(case, original, tmp_path, model):
    change, words = CASES[case]
    root = tmp_path / "inputs"
    root.mkdir()
    inputs = [shutil.copy(p, root / os.path.basename(p)) for p in original["inputs"]]
    out = tmp_path / "out"
    shutil.copytree(original["crashed"], out)
    run = dict(SETTINGS)
    model_now = tiny_model(seed=1) if change.get("model") else model
    run.update({k: v for k, v in change.items() if k in SETTINGS})
    if "inputs" in change:
        inputs = change["inputs"](root, inputs)
    if "manifest" in change:
        _edit_manifest(out, *change["manifest"])
    before = dir_bytes(out)
    with pytest.raises(TokenizeError, match="cannot resume: .*" + words) as refusal:
        tokenize_files(inputs, str(out), model_now, resume=True, **run)
    assert str(out / MANIFEST) in str(refusal.value)
    assert dir_bytes(out) == before  # nothing written, nothing removed
    with pytest.raises(Exception, match="incomplete"):
        TokenDataset(out)


def test_resume_with_the_original_settings_is_byte_identical(original, tmp_path, model):
    out = tmp_path / "out"
    shutil.copytree(original["crashed"], out)
    # A refused attempt first: it must not have spoiled the directory for the right one.
    with pytest.raises(TokenizeError, match="shard_bases"):
        tokenize_files(original["inputs"], str(out), model, resume=True, **(SETTINGS | {"shard_bases": 301}))
    stats = tokenize_files(original["inputs"], str(out), model, resume=True, **SETTINGS)
    assert stats.shards_skipped == KEPT_SHARDS and stats.shards_written > 0
    assert dir_bytes(out) == original["want"]
    ds = TokenDataset(out)
    assert 1301 in ds.lengths.tolist() and all(ds[i][1].shape[0] == n for i, n in enumerate(ds.lengths.tolist()))



def test_changed_input_or_tokenizer_is_refused(tmp_path, model):
    fasta = random_fasta(tmp_path / "in.fa")
    out = str(tmp_path / "out")
    tokenize_files([fasta], out, model, window=100, shard_bases=500)
    with pytest.raises(TokenizeError, match="tokenizer changed"):
        tokenize_files([fasta], out, tiny_model(seed=1), window=100, shard_bases=500, resume=True)
    with pytest.raises(TokenizeError, match="window was 100 and is now 90"):
        tokenize_files([fasta], out, model, window=90, shard_bases=500, resume=True)
    random_fasta(tmp_path / "in.fa", seed=5)  # same lengths, other bases
    with pytest.raises(TokenizeError, match=r"in\.fa changed since the manifest"):
        tokenize_files([fasta], out, model, window=100, shard_bases=500, resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(TokenizeError, match="not a vqdna token directory"):
        tokenize_files([fasta], str(tmp_path / "junk"), model)


@pytest.mark.parametrize("entry", ["shard-notes.txt", "shard-old/", "shard-99999.bin", "shard-00000.bin.tmp@"])
def test_foreign_entries_are_refused_before_compute(tmp_path, model, monkeypatch, entry):
    """A directory holding files named shard-* (notes, a directory, a shard without a manifest, a
    symlinked temporary file) used to be accepted and its shard-* entries deleted at the end (or, for
    a directory, to fail after all the compute). Now it is refused first, and nothing is touched."""
    fasta = random_fasta(tmp_path / "in.fa")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    name = entry.rstrip("/@")
    if entry.endswith("/"):
        (out / name).mkdir()
    elif entry.endswith("@"):
        os.symlink(victim, out / name)
    else:
        (out / name).write_text("mine")
    (out / "shard-plan.md").write_text("mine too") if entry == "shard-notes.txt" else None
    before = sorted(os.listdir(out))

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before refusing the directory")

    monkeypatch.setattr(model, "encode", no_compute)
    with pytest.raises(TokenizeError, match=re.escape(name)):
        tokenize_files([fasta], str(out), model, **KW)
    assert sorted(os.listdir(out)) == before and victim.read_text() == "keep me"


def test_shards_without_manifest_are_never_reused(tmp_path, model, clean):
    """Deleting manifest.json then --resume with other inputs used to keep the old shards (judged by
    size only) under a manifest of the new inputs. Now they are refused, named, and left alone."""
    fasta, want = clean
    out = str(tmp_path / "out")
    shutil.copytree(want, out)
    os.remove(os.path.join(out, "manifest.json"))
    other = random_fasta(tmp_path / "other.fa", seed=7)
    before = dir_bytes(out)
    with pytest.raises(TokenizeError, match="shard-00000.bin.*no manifest.json.*never reused"):
        tokenize_files([other], out, model, resume=True, **KW)
    assert dir_bytes(out) == before


@pytest.mark.parametrize("how", ["truncated-bin", "idx-pointer", "idx-size", "bin-bit", "missing", "incomplete-dir"])
def test_resume_redoes_damaged_shards(tmp_path, model, clean, how):
    """--resume on a complete directory used to return at once ("already complete") whatever the
    shards held. Now every shard's size and index are re-checked (checksums with verify=True: a
    flipped .bin bit keeps the sizes right), a damaged shard is re-done, and the result is
    byte-identical to a clean run."""
    from tests.data.test_tokens import _damage
    from vqdna.streaming.token_files import read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    if how == "incomplete-dir":  # a killed run's directory, then a shard damaged: re-checked as it goes
        write_manifest(str(out), {k: v for k, v in read_manifest(str(out)).items() if k not in ("shards", "records", "bases")} | {"complete": False})
        name = _damage(out, "truncated-bin")
    else:
        name = _damage(out, how)
    stats = tokenize_files([fasta], str(out), model, resume=True, **({"verify": True} if how == "bin-bit" else {}), **KW)
    assert dir_bytes(out) == dir_bytes(want)
    assert stats.shards_written == 1 and len(stats.redone) == 1 and name in stats.redone[0], stats.redone


def test_changed_config_with_same_weights_is_refused(tmp_path, clean):
    """The tokenizer's identity used to hash the weights only: a config.json edited to other taps (same
    weights, other codes) was accepted on resume, mixing two tokenizers under one manifest."""
    from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel

    fasta, _ = clean
    torch.manual_seed(0)
    config = VQDNATokenizerConfig(dim=16, depth=3, taps=(1, 3), codebook_sizes=(16, 40), layer_scale_init=1.0)
    VQDNATokenizerModel(config).save_pretrained(tmp_path / "tok")
    out = str(tmp_path / "out")
    tokenize_files([fasta], out, VQDNATokenizerModel.from_pretrained(tmp_path / "tok"), **KW)
    edited = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**edited, "taps": [2, 3]}))
    other = VQDNATokenizerModel.from_pretrained(tmp_path / "tok")  # the same weights file
    before = dir_bytes(out)
    assert other.tokenizer_sha256 == json.loads(before["manifest.json"])["tokenizer"]["sha256"]
    with pytest.raises(TokenizeError, match=r"config's taps was \[1, 3\] and is now \[2, 3\]"):
        tokenize_files([fasta], out, other, resume=True, **KW)
    assert dir_bytes(out) == before


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_path_names_are_refused_on_resume(tmp_path, model, clean, where):
    from vqdna.streaming.token_files import TokenFileError, read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    manifest = read_manifest(str(out))
    manifest["shards"][0]["name"] = "../victim/shard-00000" if where == "parent" else str(tmp_path / "victim" / "shard-00000")
    write_manifest(str(out), manifest)
    with pytest.raises(TokenFileError, match="shard 0 is named"):
        tokenize_files([fasta], str(out), model, resume=True, **KW)


def test_symlinked_tmp_is_never_followed(tmp_path, model, clean):
    """A symlink named shard-00000.bin.tmp planted in a killed run's directory used to be followed and
    its target overwritten. Now the directory is refused (and a symlink planted later makes the
    O_EXCL|O_NOFOLLOW open fail): the target is untouched."""
    from vqdna.streaming.token_files import read_manifest, write_manifest

    fasta, want = clean
    out = tmp_path / "out"
    shutil.copytree(want, out)
    write_manifest(str(out), {**read_manifest(str(out)), "complete": False})
    os.remove(out / "shard-00000.bin")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, out / "shard-00000.bin.tmp")
    with pytest.raises(TokenizeError, match="shard-00000.bin.tmp', a symbolic link"):
        tokenize_files([fasta], str(out), model, resume=True, **KW)
    assert victim.read_text() == "keep me"
    from vqdna.data.integrity import create_new

    with pytest.raises(FileExistsError):
        create_new(str(out / "shard-00000.bin.tmp"))
    assert victim.read_text() == "keep me"


def test_format_1_directory_is_not_continued(tmp_path, model):
    """Format 1 (no checksums) is read (tests/data/test_tokens.py) but not continued: its shards
    could not be checked like the new ones."""
    out = tmp_path / "tokens-v1"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "data", "fixtures", "tokens-v1"), out)
    fasta = random_fasta(tmp_path / "in.fa", lengths=[0, 5, 63, 200, 3])
    with pytest.raises(TokenizeError, match="cannot resume: it was written in format version 1 by an older vqdna"):
        tokenize_files([fasta], str(out), model, resume=True, window=50, batch_size=4, shard_bases=150)
