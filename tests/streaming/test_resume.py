"""Resuming a token directory (vqdna.streaming): every setting the manifest guards refuses a resume
that would mix shards of two configurations, names the setting, and touches nothing; the original
settings still resume to the bytes of an uninterrupted run.

The interrupted directory is made from a finished one by the documented layout alone (manifest not
complete, its totals dropped, later shards missing, a half-written temporary shard), so these tests
do not depend on how the writer fails."""

import json
import os
import shutil

import pytest

from tests.streaming.test_tokenize_files import _dir_bytes, _random_fasta, _tiny_model, model, one_thread  # noqa: F401 (fixtures)
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
    inputs = [_random_fasta(root / "one.fa", seed=1), _random_fasta(root / "two.fa.gz", seed=2, gz=True)]
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
    return {"root": root, "inputs": inputs, "want": _dir_bytes(done), "crashed": crashed}


def _edit_manifest(directory, key, value):
    path = os.path.join(directory, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest[key] = value
    write_manifest(str(directory), manifest)


def _other_content(root, inputs):
    # Same name and size, other bases: only the content fingerprint can tell.
    _random_fasta(root / "one.fa", seed=99)
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
    model_now = _tiny_model(seed=1) if change.get("model") else model
    run.update({k: v for k, v in change.items() if k in SETTINGS})
    if "inputs" in change:
        inputs = change["inputs"](root, inputs)
    if "manifest" in change:
        _edit_manifest(out, *change["manifest"])
    before = _dir_bytes(out)
    with pytest.raises(TokenizeError, match="cannot resume: .*" + words) as refusal:
        tokenize_files(inputs, str(out), model_now, resume=True, **run)
    assert str(out / MANIFEST) in str(refusal.value)
    assert _dir_bytes(out) == before  # nothing written, nothing removed
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
    assert _dir_bytes(out) == original["want"]
    ds = TokenDataset(out)
    assert 1301 in ds.lengths.tolist() and all(ds[i][1].shape[0] == n for i, n in enumerate(ds.lengths.tolist()))

