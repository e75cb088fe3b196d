"""Settings (vqdna.streaming.settings): one frozen, typed record, resolved and validated on
construction; the CLI's defaults are the library's."""

import argparse
import dataclasses

import pytest

from vqdna.commands import tokenize as tokenize_command
from vqdna.streaming.settings import DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS, DEFAULT_WINDOW, Settings, TokenizeError


def test_defaults_are_resolved_once_and_frozen():
    s = Settings(device="cpu")
    assert (s.window, s.batch_size, s.dtype, s.shard_bases, s.shard_records) == (DEFAULT_WINDOW, 8, "fp32", DEFAULT_SHARD_BASES, DEFAULT_SHARD_RECORDS)
    assert s.device == "cpu" and s.torch_device.type == "cpu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.window = 5
    assert s.manifest_fields() == {"window": DEFAULT_WINDOW, "batch_size": 8, "shard_bases": DEFAULT_SHARD_BASES,
                                   "shard_records": DEFAULT_SHARD_RECORDS, "compute": {"device": "cpu", "dtype": "fp32"}}


@pytest.mark.parametrize("kw,message", [
    (dict(window=0), "window must be an integer >= 1, got 0"),
    (dict(batch_size=True), "batch size must be an integer >= 1, got True"),
    (dict(shard_bases=2.0), "shard bases must be an integer >= 1, got 2.0"),
    (dict(shard_records=-1), "shard records must be an integer >= 1, got -1"),
    (dict(device="meta"), "device must be cpu or cuda, got 'meta'"),
    (dict(dtype="fp16"), "dtype must be fp32 or bf16, got 'fp16'"),
    (dict(dtype="bf16"), "bf16 inference runs on CUDA devices"),
])
def test_bad_settings_are_refused_by_name(kw, message):
    with pytest.raises(TokenizeError, match=message.replace("(", "\\(")):
        Settings(**{"device": "cpu", **kw})


def test_cli_defaults_are_the_library_defaults():
    parser = argparse.ArgumentParser()
    tokenize_command.add_arguments(parser)
    args = parser.parse_args(["in.fa", "--out", "o"])
    assert args.window == DEFAULT_WINDOW and args.shard_bases == DEFAULT_SHARD_BASES
