"""Smoke correctness of every kernel path against the reference, one isolated case at a time.

    python3 bench/gpu_smoke.py [--device cuda|cpu] [--backends cuda,triton,auto] [--quick | --small]
                               [--jsonl FILE] [--tag STEP] [--only GLOB] [--list]

For each requested backend (default: cuda,triton on a GPU; native,reference on the CPU; "auto" adds
the stem shapes `backend="auto"` must route around a refusing kernel) and dtype (float32, bfloat16,
float16), on small awkward shapes: N = 1, row/code/dim tails (D not a multiple of 16), K = 1, exact
ties across K tiles (lowest index wins), NaN/Inf rows and a NaN code, inputs one element off a
16-byte boundary (2 bytes for 16-bit dtypes), HRQ with L = 2, 3 and 5, EMA fast and deterministic at
K = 65536 (CUDA's global-atomic path) and on both sides of the Triton EMA's sorted-path switch,
`ema_update`, `kmeans`, and the stem at W = 5, 9, 33 and D = 1030. Every call asserts that the backend
that ran (`last_backend`) is the one requested.

Each case is isolated: an exception is recorded and the rest still run (a CUDA error that poisons the
context fails the cases after it; bench/gpu.sh runs each backend in its own process). Each result is
one JSON line, appended to --jsonl as soon as the case ends:
    {"kind": "smoke", "step", "case", "op", "backend", "dtype", "status": "pass"|"fail"|"refused",
     "seconds", "error"?, "traceback"?, ...}
"refused": the CUDA stem raised a clear ValueError/RuntimeError for a width over 32 (allowed).
Exit status: 0 when no case failed, 1 otherwise.

--small: one or two shapes per kernel path (for compute-sanitizer); --quick: fewer shapes (the
Triton interpreter on the CPU). --triton-configs N keeps N autotune configs per Triton kernel (the
first and the last; 0 = all): correctness needs no autotuning, and on a cold GPU compiles dominate.
--inject-failure GLOB / --inject-hang GLOB make matching cases raise / sleep (tests of the harness).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
import traceback
import zlib

import torch

from vqdna.kernels import (
    available_backends,
    ema_stats,
    ema_update,
    hrq_quantize,
    kmeans,
    last_backend,
    lookup,
    reference,
    sample_codes,
    stem,
)
from vqdna.kernels.ops.registry import declarations
from vqdna.kernels.ops.sample_codes.declaration import PHILOX_BACKENDS
from vqdna.kernels.ops.sample_codes.wrapper import philox_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CUDA stem may refuse W > 32 (one warp loads the taps); anything else refusing is a failure.
CUDA_STEM_MAX_WIDTH = 32


class Refused(Exception):
    """A kernel declined a shape with a clear error (recorded as "refused", not as a failure)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", default=None, help="comma-separated; default cuda,triton on cuda, native,reference on cpu")
    p.add_argument("--dtypes", default="bfloat16,float32,float16", help="in run order (bf16, the model's, first)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes (the Triton interpreter)")
    size.add_argument("--small", action="store_true", help="one or two small shapes per kernel path (compute-sanitizer)")
    p.add_argument("--triton-configs", type=int, default=2, help="autotune configs kept per Triton kernel (0 = all)")
    p.add_argument("--jsonl", default=None, help="append one JSON line per case here (default $OUT/smoke.jsonl, else ./smoke.jsonl)")
    p.add_argument("--tag", default="smoke", help="the 'step' field of every line")
    p.add_argument("--only", default=None, help="run the cases whose name matches this glob")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--inject-failure", default=None, metavar="GLOB", help="matching cases raise (tests of the harness)")
    p.add_argument("--inject-hang", default=None, metavar="GLOB", help="matching cases sleep forever (tests of the harness)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# inputs


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view one element past a 16-byte boundary (the kernels' scalar
    fallback: 2 bytes off for 16-bit dtypes, 4 for float32)."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = flat[1 : 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def _exact_scores(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """||z - e_k||^2 in float64 from the values as stored (after rounding to their dtype): [N, K]."""
    z64, e64 = z.detach().cpu().double(), e.detach().cpu().double()
    return (z64.pow(2).sum(-1)[:, None] - 2 * z64 @ e64.T + e64.pow(2).sum(-1)[None]).clamp_min(0)


def _tolerance(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per-row slack [N] for float32 accumulation of a D-long dot product: 4 D 2^-24 (|z|^2 + max |e|^2)."""
    d = z.shape[-1]
    scale = z.detach().cpu().double().pow(2).sum(-1) + e.detach().cpu().double().pow(2).sum(-1).max()
    return 4 * d * 2.0**-24 * scale + 1e-12


def check_nearest(z, e, codes, dist, rows=None) -> dict:
    """codes [N] each a nearest code of z within the tolerance (near-ties may go either way), dist
    [N] its squared distance; rows: the rows to check (default all). Returns info for the record."""
    exact = _exact_scores(z, e)
    codes = codes.detach().cpu().long()
    dist = dist.detach().cpu().double()
    if rows is not None:
        exact, codes, dist, tol = exact[rows], codes[rows], dist[rows], _tolerance(z, e)[rows]
    else:
        tol = _tolerance(z, e)
    assert bool(((codes >= 0) & (codes < e.shape[0])).all()), f"codes out of [0, {e.shape[0]})"
    chosen = exact.gather(1, codes[:, None])[:, 0]
    excess = chosen - exact.min(1).values - tol
    bad = int(excess.argmax())
    assert float(excess[bad]) <= 0, (f"row {bad}: code {int(codes[bad])} is farther than the nearest "
                                     f"({int(exact[bad].argmin())}) by {float(excess[bad] + tol[bad]):.3g} > tol {float(tol[bad]):.3g}")
    derr = (dist - chosen).abs() - tol
    bad = int(derr.argmax())
    assert float(derr[bad]) <= 0, f"row {bad}: dist {float(dist[bad]):.6g}, exact {float(chosen[bad]):.6g}"
    return {"worst_excess_over_tol": float(excess.max())}


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().long() == b.detach().cpu().long()).double().mean())


# ---------------------------------------------------------------------------------------------
# checks (each raises AssertionError with what differs)


class Checks:
    def __init__(self, device: str):
        self.device = device

    def _ran(self, op: str, backend: str) -> None:
        if backend != "auto":
            assert last_backend(op) == backend, f"{op}: asked for {backend}, {last_backend(op)} ran"

    def lookup(self, backend, dtype, n, k, d, name, mis=False):
        g = _gen(name)
        e = torch.randn(k, d, generator=g)
        z = e[torch.randint(k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
        z, e = z.to(self.device, dtype), e.to(self.device, dtype)
        if mis:
            z, e = misaligned(z), misaligned(e)
        codes, dist = lookup(z, e, backend=backend)
        self._ran("lookup", backend)
        assert codes.shape == (n,) and codes.dtype == torch.int32 and dist.dtype == torch.float32
        info = check_nearest(z, e, codes, dist)
        ref_codes, _ = reference.lookup(z.cpu(), e.cpu())
        info["agree_with_reference"] = _agreement(codes, ref_codes)
        return info

    def ties(self, backend, dtype, name, d=130, k=700):
        """Small integers (exact in every dtype): each z row equals several codes spread over K tiles."""
        g = _gen(name)
        base = torch.randint(-3, 4, (100, d), generator=g).float()
        cb = base[torch.arange(k) % 100]  # code j == code j + 100 == ...: ties across tiles
        z = torch.randint(-3, 4, (300, d), generator=g).float()
        z[:200] = cb[torch.randint(k, (200,), generator=g)]
        exact = _exact_scores(z, cb)
        codes, dist = lookup(z.to(self.device, dtype), cb.to(self.device, dtype), backend=backend)
        self._ran("lookup", backend)
        want = exact.argmin(1)  # first minimum: the lowest index
        wrong = (codes.cpu().long() != want).nonzero()
        assert len(wrong) == 0, f"{len(wrong)} rows not resolved to the lowest tied index (row {int(wrong[0])}: {int(codes[wrong[0]])} vs {int(want[wrong[0]])})"
        assert torch.equal(dist.cpu().double(), exact.min(1).values), "inexact distance on small integers"

    def nonfinite(self, backend, dtype, name):
        g = _gen(name)
        z = torch.randn(50, 19, generator=g)
        z[3, 5], z[10, 0], z[11, 2] = float("nan"), float("inf"), float("-inf")
        e = torch.randn(300, 19, generator=g)
        e[7, 2] = float("nan")
        zd, ed = z.to(self.device, dtype), e.to(self.device, dtype)
        codes, dist = lookup(zd, ed, backend=backend)
        self._ran("lookup", backend)
        dist = dist.cpu()
        assert not torch.isfinite(dist[[3, 10, 11]]).any(), f"a non-finite row got a finite dist: {dist[[3, 10, 11]].tolist()}"
        good = torch.ones(50, dtype=torch.bool)
        good[[3, 10, 11]] = False
        finite_codes = torch.ones(300, dtype=torch.bool)
        finite_codes[7] = False
        assert not (codes.cpu()[good] == 7).any(), "the NaN code won a finite row"
        # The finite rows against the finite codes: code 7 excluded, indices mapped back.
        keep = finite_codes.nonzero()[:, 0]
        remap = torch.full((300,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        check_nearest(zd[good.to(zd.device)], ed[keep.to(ed.device)], remap[codes.cpu().long()[good]], dist[good])

    def hrq(self, backend, dtype, n, d, sizes, name, mis=False):
        g = _gen(name)
        cbs = [(torch.randn(k, d, generator=g) * 0.5**i).to(self.device, dtype) for i, k in enumerate(sizes)]
        zs = [(torch.randn(n, d, generator=g) * 0.5**i).to(self.device, dtype) for i in range(len(sizes))]
        if mis:
            zs, cbs = [misaligned(z) for z in zs], [misaligned(c) for c in cbs]
        codes, levels = hrq_quantize(zs, cbs, backend=backend)
        self._ran("hrq_quantize", backend)
        assert codes.shape == (len(sizes), n) and levels.shape == (len(sizes), n, d) and levels.dtype == dtype
        # Each level against its own previous choice (docs/design.md §2.2): H_l = round(2 Z_l - C_{l-1}[M_{l-1}]),
        # M_l a nearest code of H_l; zhat_levels[l] = round(mean of the chosen embeddings, float32).
        running = torch.zeros(n, d, dtype=torch.float32)
        prev = None
        codes_c = codes.cpu().long()
        for level, (z, cb) in enumerate(zip(zs, cbs)):
            zc, cbc = z.cpu(), cb.cpu()
            h = zc if prev is None else (2.0 * zc.float() - prev.float()).to(dtype)
            try:
                check_nearest(h, cbc, codes_c[level], _exact_scores(h, cbc).gather(1, codes_c[level][:, None])[:, 0])
            except AssertionError as exc:
                raise AssertionError(f"level {level}: {exc}") from None
            prev = cbc[codes_c[level]]
            running += prev.float()
            want = (running / (level + 1)).to(dtype)
            err = (levels[level].cpu().double() - want.double()).abs()
            ulp = want.double().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
            assert bool((err <= 2 * ulp).all()), f"zhat_levels[{level}] off its codes' mean by {float(err.max()):.3g}"
        # The fused per-level loss rows/sums and report (issue 17), and the codes-only mode: the same codes.
        codes2, levels2, sqdist, sqdist_sum, nonfinite = hrq_quantize(zs, cbs, backend=backend, losses=True)
        assert torch.equal(codes2, codes) and torch.equal(levels2, levels)
        want_sq, _, _ = reference.hrq_level_losses([z.cpu() for z in zs], levels.cpu())
        size = torch.stack([z.cpu().double().pow(2).sum(-1) + lv.cpu().double().pow(2).sum(-1) for z, lv in zip(zs, levels)])
        assert bool(((sqdist.cpu().double() - want_sq.double()).abs() <= 1e-4 * size + 1e-12).all()), "sqdist off"
        assert bool(((sqdist_sum.cpu().double() - want_sq.double().sum(-1)).abs() <= 1e-4 * size.sum(-1) + 1e-12).all())
        assert nonfinite.tolist() == [[0, -1]] * len(sizes), nonfinite
        assert torch.equal(hrq_quantize(zs, cbs, backend=backend, codes_only=True), codes), "codes-only codes differ"
        ref_codes, _ = reference.hrq_quantize([z.cpu() for z in zs], [c.cpu() for c in cbs])
        return {"agree_with_reference": _agreement(codes, ref_codes)}

    def _ema_inputs(self, dtype, n, d, k, name, mask=True, prev=False):
        g = _gen(name)
        x = torch.randn(n, d, generator=g).to(dtype)
        codes = (torch.rand(n, generator=g).pow(3) * k).long().clamp_max(k - 1).to(torch.int32)  # skewed: hot codes
        m = (torch.rand(n, generator=g) < 0.8) if mask else None
        pc = torch.randint(9, (n,), generator=g, dtype=torch.int32) if prev else None
        pcb = torch.randn(9, d, generator=g).to(dtype) if prev else None
        return x, codes, m, pc, pcb

    def ema(self, backend, dtype, n, d, k, det, name, mask=True, prev=False):
        x, codes, m, pc, pcb = self._ema_inputs(dtype, n, d, k, name, mask, prev)
        dev = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        call = lambda: ema_stats(dev(x), dev(codes), k, mask=dev(m), prev_codes=dev(pc), prev_codebook=dev(pcb),  # noqa: E731
                                 deterministic=det, backend=backend)
        counts, sums = call()
        self._ran("ema_stats", backend)
        v = x.double() if pc is None else (2 * x.double() - pcb.double()[pc.long()])
        w = torch.ones(n, dtype=torch.float64) if m is None else m.double()
        want_n = torch.zeros(k, dtype=torch.float64).index_add_(0, codes.long(), w)
        want_s = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes.long(), v * w[:, None])
        mag = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes.long(), (v * w[:, None]).abs())
        assert torch.equal(counts.cpu().double(), want_n), f"counts differ at code {int((counts.cpu().double() != want_n).nonzero()[0])}"
        err = (sums.cpu().double() - want_s).abs() - (3e-5 * mag + 1e-6)
        assert float(err.max()) <= 0, f"sums differ at code {int(err.max(1).values.argmax())} by {float(err.max()):.3g} over tolerance"
        if det:
            counts2, sums2 = call()
            assert torch.equal(sums2, sums) and torch.equal(counts2, counts), "deterministic mode is not bitwise repeatable"

    def ema_update(self, backend, dtype, name, n=500, d=24, k=40):
        x, codes, m, _, _ = self._ema_inputs(dtype, n, d, k, name)
        g = _gen(name + "state")
        size0, sum0 = torch.rand(k, generator=g) * 5, torch.randn(k, d, generator=g)
        size, esum = size0.clone().to(self.device), sum0.clone().to(self.device)  # updated in place
        cb = torch.empty(k, d, dtype=dtype, device=self.device)
        ema_update(x.to(self.device), codes.to(self.device), size, esum, cb, decay=0.9, mask=m.to(self.device), backend=backend)
        self._ran("ema_stats", backend)
        want_size, want_sum, want_cb = reference.ema_update(x.double(), codes, size0.double(), sum0.double(), decay=0.9, mask=m)
        for label, got, want in (("cluster_size", size, want_size), ("embed_sum", esum, want_sum)):
            err = float((got.cpu().double() - want).abs().max())
            assert err <= 1e-4 * max(1.0, float(want.abs().max())), f"{label} off by {err:.3g}"
        err = float(((cb.cpu().double() - want_cb).abs() / (want_cb.abs() + 1e-3)).max())
        assert err <= 2 * torch.finfo(dtype).eps + 1e-5, f"codebook off by {err:.3g} (relative)"

    def kmeans(self, backend, dtype, name, n=600, d=8, k=5):
        """Well separated blobs: every backend assigns alike, so centroids match the reference's."""
        g = _gen(name)
        centers = torch.randn(k, d, generator=g) * 10
        x = (centers[torch.arange(n) % k] + 0.1 * torch.randn(n, d, generator=g)).to(dtype)
        got = kmeans(x.to(self.device), k, iters=4, seed=3, backend=backend)
        self._ran("lookup", backend)
        self._ran("ema_stats", backend)
        want = reference.kmeans(x, k, iters=4, seed=3)
        err = float((got.cpu().double() - want.double()).abs().max())
        assert err <= 1e-3, f"centroids differ from the reference by {err:.3g}"

    def stem(self, backend, dtype, b, length, d, w, name):
        g = _gen(name)
        ids = torch.randint(0, 6, (b, length), generator=g).to(torch.uint8)  # 0..4 bases, 5 pad
        wt, bias = torch.randn(d, 5, w, generator=g) / w**0.5, 0.5 * torch.randn(d, generator=g)
        lw, lb = 1 + 0.2 * torch.randn(d, generator=g), 0.2 * torch.randn(d, generator=g)
        try:
            got = stem(ids.to(self.device), *(t.to(self.device) for t in (wt, bias, lw, lb)), out_dtype=dtype, backend=backend)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            text = str(exc)
            if backend == "cuda" and w > CUDA_STEM_MAX_WIDTH and "CUDA error" not in text and "illegal" not in text:
                raise Refused(f"{type(exc).__name__}: {text.splitlines()[0][:300]}") from None
            raise
        self._ran("stem", backend)
        assert got.shape == (b, length, d) and got.dtype == dtype
        want = reference.stem(ids, wt.double(), bias.double(), lw.double(), lb.double())
        rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        err = (got.cpu().double() - want).abs() - (1e-5 + rtol * want.abs())
        bad = err.flatten().argmax()
        assert float(err.flatten()[bad]) <= 0, f"element {tuple(int(i) for i in torch.unravel_index(bad, err.shape))} off by {float(err.flatten()[bad]):.3g} over tolerance"

    def sample_codes(self, backend, dtype, n, k, d, cosine, name, c=0):
        """Gumbel-max sampling against its spec under the same torch seed (Philox for the triton
        backend, reference.sample_codes_philox; else the torch stream): codes equal except at near-ties
        of the spec's scores (the GPU's approximate log and sqrt), quantized exact, dist close.
        c > 0: per-head codebooks [c, k, d] with z [n, c, d] (one call for all heads)."""
        g = _gen(name)
        heads = (c,) if c else ()
        z, e = torch.randn(n, *heads, d, generator=g), torch.randn(*heads, k, d, generator=g)
        zd, ed = z.to(self.device, dtype), e.to(self.device, dtype)
        s = zlib.crc32(name.encode())
        torch.manual_seed(s)
        codes, quantized, dist = sample_codes(zd, ed, 0.5, cosine=cosine, backend=backend)
        self._ran("sample_codes", backend)
        torch.manual_seed(s)
        # [n, c, ...] -> [c n, ...] (head-major: the order of the spec's draws and of philox_scores below)
        flat = (lambda t: t.transpose(0, 1).reshape(-1, *t.shape[2:])) if c else (lambda t: t)
        if backend in PHILOX_BACKENDS:
            seed = philox_seed(zd.device).cpu()
            want = reference.sample_codes_philox(z, e, 0.5, cosine, seed)[0]
            bad = flat(codes.cpu()) != flat(want)
            if bad.any():  # near-ties only: the spec's scores of the two codes within 1e-5 (relative)
                sc = (torch.cat([reference.philox_scores(z[:, h], e[h], 0.5, cosine, seed, h * n) for h in range(c)])
                      if c else reference.philox_scores(z, e, 0.5, cosine, seed))[bad].double()
                gap = (sc.gather(1, flat(codes.cpu())[bad, None]) - sc.gather(1, flat(want)[bad, None])).abs()[:, 0]
                far = gap > 1e-5 * (1 + sc.abs().amax(1))
                assert not far.any(), f"{int(far.sum())} rows sampled another code than the spec's (gap {float(gap.max()):.3g})"
        else:
            want = reference.sample_codes(zd, ed, 0.5, cosine)[0]
            assert torch.equal(codes, want), f"codes differ at {int((codes != want).sum())} rows"
        got = flat(codes.cpu())
        chosen = e[torch.arange(c).repeat_interleave(n), got] if c else e[got]
        assert torch.equal(flat(quantized.cpu()), chosen), "quantized is not codebook[codes]"
        want_dist = (flat(z).double() - chosen.double()).pow(2).sum(-1)
        err = float(((flat(dist.cpu()).double() - want_dist).abs() / (want_dist + 1)).max())
        assert err <= 1e-5, f"dist off by {err:.3g} (relative)"
        return {"agree_with_reference": _agreement(codes, want)}


# ---------------------------------------------------------------------------------------------
# the case list


def ema_switch_rows() -> int:
    """Rows at which the Triton EMA's fast mode switches to its sorted path (2^15 on a GPU, lower
    under the interpreter); 2^15 when Triton is absent."""
    try:
        from vqdna.kernels.ops.ema_stats import triton_kernel as triton_ema
    except ImportError:
        return 1 << 15
    return int(getattr(triton_ema, "_SORTED_MIN_ROWS", 1 << 15))


def build_cases(chk: Checks, backends, dtypes, mode: str) -> list:
    """[(name, op, backend, dtype, fn)] in run order. mode: "full" | "quick" | "small"."""
    full, small = mode == "full", mode == "small"
    switch = ema_switch_rows()
    cases = []

    def add(op, backend, dtype, label, fn, *args, **kw):
        name = f"{op}/{backend}/{dtype}/{label}"
        cases.append((name, op, backend, dtype, lambda: fn(backend, DTYPES[dtype], *args, name=name, **kw)))

    for backend in backends:
        if backend == "auto":
            continue
        for dt in dtypes:
            # lookup: N = 1, tails, D % 16 != 0, K = 1, many K tiles, misaligned (D % 8 == 0 and not)
            shapes = [(300, 700, 130), (3, 1, 1)] if small else [(1, 7, 19), (300, 700, 130), (3, 1, 1), (300, 1, 130)]
            if full:
                shapes += [(4097, 513, 384), (257, 4096, 64), (1000, 700, 130)]
            for n, k, d in shapes:
                add("lookup", backend, dt, f"N{n}K{k}D{d}", chk.lookup, n, k, d)
            add("lookup", backend, dt, "misaligned-D384", chk.lookup, 300, 700, 384, mis=True)
            if not small:
                add("lookup", backend, dt, "misaligned-D130", chk.lookup, 300, 700, 130, mis=True)
                add("lookup", backend, dt, "ties", chk.ties)
            add("lookup", backend, dt, "nonfinite", chk.nonfinite)
            # hrq_quantize: L = 2, 3, 5 (> 4: Triton's multi-launch path), N = 1 with K = 1
            hrq = [(257, 64, (8, 64, 513)), (100, 24, (4, 8, 16, 32, 64))]
            if not small:
                hrq += [(1, 19, (1, 3))]
            if full:
                hrq += [(1000, 384, (64, 512)), (300, 130, (5, 9, 17, 33, 65))]
            for n, d, sizes in hrq:
                add("hrq_quantize", backend, dt, f"N{n}D{d}L{len(sizes)}K{'+'.join(map(str, sizes))}", chk.hrq, n, d, sizes)
            add("hrq_quantize", backend, dt, "misaligned", chk.hrq, *((100, 64, (16, 64)) if mode == "quick" else (300, 384, (64, 512))), mis=True)
            # ema_stats: shared-table and global-atomic (K = 65536) paths, both sides of the switch
            ema = {"small": [(1000, 384, 512), (1000, 17, 65536)], "quick": [(1, 19, 1), (300, 40, 70), (1000, 17, 65536)],
                   "full": [(1, 19, 1), (1000, 384, 512), (1000, 17, 65536)]}[mode]
            if full:
                ema += [(4099, 384, 65536)]
            for n, d, k in ema:
                for det in (False, True):
                    if det and k == 65536 and mode == "quick":
                        continue  # 65536 sorted segments: minutes in the Triton interpreter
                    add("ema_stats", backend, dt, f"N{n}D{d}K{k}-{'det' if det else 'fast'}", chk.ema, n, d, k, det)
            if not small:
                for n in (switch - 1, switch):
                    add("ema_stats", backend, dt, f"N{n}D24K513-fast-switch", chk.ema, n, 24, 513, False)
            add("ema_stats", backend, dt, "prev-codes", chk.ema, 300, 24, 40, False, prev=True)
            add("ema_stats", backend, dt, "prev-codes-det", chk.ema, 300, 24, 40, True, prev=True)
            if not small:
                add("ema_update", backend, dt, "N500D24K40", chk.ema_update)
            if dt in ("float32", "bfloat16") and not small:
                add("kmeans", backend, dt, "N600D8K5", chk.kmeans)
            # stem: W = 5, 9, 33 (CUDA may refuse > 32), D = 1030, L = 1
            stems = [(2, 37, 384, 9), (1, 40, 1030, 5), (1, 50, 64, 33)]
            if not small:
                stems += [(2, 37, 384, 5), (3, 1, 16, 5)]
            if full:
                stems += [(1, 40, 1030, 9), (2, 70, 64, 65)]
            for b, length, d, w in stems:
                add("stem", backend, dt, f"B{b}L{length}D{d}W{w}", chk.stem, b, length, d, w)
        if backend in available_backends(chk.device, "sample_codes") and "float32" in dtypes:
            # sample_codes (float32 only): N = 1 with K = 1, tails, D % 16 != 0, many K tiles
            for n, k, d in [(1, 1, 1), (300, 700, 130)] + ([(4097, 513, 384)] if full else []):
                for cosine in (False, True):
                    add("sample_codes", backend, "float32", f"N{n}K{k}D{d}{'-cosine' if cosine else ''}", chk.sample_codes,
                        n, k, d, cosine)
            # per-head codebooks: C = 3 in one call (N = 1 with K = 1; D % 16 != 0, many K tiles)
            for n, c, k, d in [(1, 3, 1, 5), (300, 3, 700, 130)]:
                add("sample_codes", backend, "float32", f"N{n}C{c}K{k}D{d}", chk.sample_codes, n, k, d, False, c=c)
    if "auto" in backends:
        # backend="auto" must not pick a kernel that refuses the shape (wide kernels, big tables).
        for b, length, d, w in [(1, 50, 64, 33), (1, 50, 64, 65), (1, 20, 2048, 5), (1, 20, 2048, 9)]:
            add("stem", "auto", "float32", f"B{b}L{length}D{d}W{w}", chk.stem, b, length, d, w)
    return cases


def limit_triton_configs(keep: int) -> None:
    """Keep `keep` autotune configs (the first and the last) of every Triton kernel of vqdna."""
    if keep <= 0:
        return
    import importlib

    from triton.runtime.autotuner import Autotuner

    from vqdna.kernels.gpu_check import triton_kernel_modules

    for mod in triton_kernel_modules():
        try:
            module = importlib.import_module(mod)
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > keep:
                obj.configs = [obj.configs[0], obj.configs[-1]][:keep] if keep <= 2 else obj.configs[:keep - 1] + obj.configs[-1:]


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    backends = (args.backends or ("cuda,triton" if device == "cuda" else "native,reference")).split(",")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        print(f"gpu_smoke: unknown dtype(s) {unknown}; expected {list(DTYPES)}", file=sys.stderr)
        return 2
    path = args.jsonl or os.path.join(os.environ.get("OUT", "."), "smoke.jsonl")
    mode = "small" if args.small else "quick" if args.quick else "full"
    chk = Checks(device)
    cases = build_cases(chk, backends, dtypes, mode)
    if args.only:
        cases = [c for c in cases if fnmatch.fnmatch(c[0], args.only)]
    if args.list:
        print("\n".join(c[0] for c in cases))
        return 0
    counts = {"pass": 0, "fail": 0, "refused": 0}

    def record(row):
        counts[row["status"]] += 1
        with open(path, "a") as f:
            f.write(json.dumps({"kind": "smoke", "step": args.tag, **row}) + "\n")
        head = {"pass": "PASS   ", "fail": "FAIL   ", "refused": "REFUSED"}[row["status"]]
        print(f"{head} {row['case']}" + (f"  {row['error'][:300]}" if "error" in row else ""), flush=True)

    for backend in backends:
        if backend == "auto":
            continue
        # One line per requested backend that cannot run here (its cases then fail with the reason).
        ops = [op for op, decl in declarations().items() if decl.reference is not None]  # not the composites
        missing = [op for op in ops if backend not in available_backends(device, op)]
        if missing:
            record({"case": f"available/{backend}", "op": None, "backend": backend, "dtype": None, "status": "fail",
                    "seconds": 0.0, "error": f"backend {backend} cannot run {', '.join(missing)} on {device} here"})
    if "triton" in backends:
        try:
            limit_triton_configs(args.triton_configs)
        except Exception as exc:  # noqa: BLE001  (a renamed internal must not stop the checks)
            print(f"gpu_smoke: could not limit the Triton configs ({exc}); autotuning them all", flush=True)

    for name, op, backend, dtype, fn in cases:
        t0 = time.perf_counter()
        row = {"case": name, "op": op, "backend": backend, "dtype": dtype}
        try:
            if args.inject_hang and fnmatch.fnmatch(name, args.inject_hang):
                while True:
                    time.sleep(1)
            if args.inject_failure and fnmatch.fnmatch(name, args.inject_failure):
                raise AssertionError("injected failure (--inject-failure)")
            info = fn() or {}
            if device == "cuda":
                torch.cuda.synchronize()  # an asynchronous error belongs to this case
            row.update(status="pass", **info)
        except Refused as exc:
            row.update(status="refused", error=str(exc))
        except Exception as exc:  # noqa: BLE001  (each case is isolated)
            row.update(status="fail", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
        row["seconds"] = round(time.perf_counter() - t0, 3)
        record(row)
    print(f"gpu_smoke: {counts['pass']} passed, {counts['fail']} failed, {counts['refused']} refused ({path})", flush=True)
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
