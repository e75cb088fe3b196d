"""The `vqdna` entry point (vqdna/cli.py): the passive OpenMP wait policy is set before torch loads,
unless the user chose one."""

import os
import sys


def test_passive_openmp_reexecs_before_torch_unless_the_user_chose(monkeypatch):
    from vqdna import cli

    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, argv)))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.passive_openmp(None)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and not calls  # the user's choice stays
    monkeypatch.delenv("OMP_WAIT_POLICY")
    cli.passive_openmp(["finetune"])  # in-process (tests, embedding programs): no re-exec
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and not calls
    monkeypatch.delenv("OMP_WAIT_POLICY")
    cli.passive_openmp(None)  # as the program: torch is loaded already, so the process restarts itself
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert calls == [(sys.executable, [sys.executable, *sys.orig_argv[1:]])]
