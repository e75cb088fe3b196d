"""Timed points at realistic sizes, each one JSON line as soon as it is measured, against the device's
limits measured in the same run.

    python3 bench/gpu_timings.py [--device cuda|cpu] [--backends cuda,triton] [--quick]
                                 [--jsonl FILE] [--tag STEP] [--only GLOB] [--list]

Points, in this order (names are what --only matches):
  limits/matmul          bf16 matmul TFLOP/s on an 8192^3 product (TF32 off; float32 1024^3 on the CPU)
  limits/copy            device-to-device copy GB/s (bytes read + written), 1 GiB of float32
  lookup/K*/B            lookup bf16 N = 2^20, D = 384, K = 512 / 4096 / 65536, per backend B and the
                         peer torch (addmm of -2 z e^T onto ||e||^2 in bf16, then argmin; rows chunked
                         to bound the score matrix): fraction of the matmul peak (2 N K D FLOP) and the
                         speed-up over torch. Targets: >= 70% of peak and >= 3x torch at K = 4096.
  hrq/B                  hrq_quantize 64/512 at N = 2^20 against the two plain lookups (K = 64 and 512,
                         timed alone): target <= 1.1x their sum.
  ema_update/K*/B/mode   ema_update N = 2^20, D = 384, K = 512 / 65536, fast and deterministic: fraction
                         of the copy bandwidth (x, codes read; state read and written; codebook
                         written). Target >= 70%.
  stem/B                 stem bf16 out, B x L = 64 x 16384 bases, D = 384, W = 5: bases/s and GB/s.
  tokenize/*             end to end through vqdna.streaming.tokenize_files (what `vqdna tokenize` runs),
                         bf16 on a FASTA file generated here: vqdna-base with random weights (no trained
                         vqdna-base ships; throughput does not depend on the weights) per backend, and
                         the bundled vqdna-small; one warm-up run on a smaller file first. Target >= 20 M
                         bases/s (vqdna-base). Then the codes' agreement with the CPU float32 path.
  mlm/bert-base          masked-LM pre-training steps/s, bert-base, batch 32 x 256 tokens, SDPA, bf16
                         autocast, AdamW (for the record).
--quick: small sizes (the same code on the CPU in seconds). Timing: CUDA events around each call
(host clock on the CPU), warm-up calls first, the median of the repeats (min kept too).
Lines: {"kind": "timing", "step", "point", "op", "backend", "dtype", "shape", "ms", "ms_min", "repeats",
"<rate>", "fraction_of_peak"?, "target"?, "met"?, ...}; a failed point: {"point", "status": "fail", "error"}.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

from vqdna.kernels import ema_update, hrq_quantize, last_backend, lookup, stem

# Sizes: (the device's, --quick's)
SIZES = {
    "full": dict(n=1 << 20, d=384, lookup_k=(512, 4096, 65536), hrq=(64, 512), ema_k=(512, 65536), matmul=8192,
                 copy=1 << 28, stem=(64, 16384), bases=1 << 25, agree_bases=1 << 17, mlm=("bert-base", 32, 256)),
    "quick": dict(n=1 << 12, d=64, lookup_k=(64, 256, 1024), hrq=(16, 64), ema_k=(64, 1024), matmul=1024,
                  copy=1 << 22, stem=(2, 4096), bases=1 << 15, agree_bases=1 << 13, mlm=("bert-tiny", 2, 64)),
}
TOKENIZE_TARGET = 20e6  # bases/s, vqdna-base bf16, one H200 (issue 16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backends", default=None, help="comma-separated; default cuda,triton on cuda, native on cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds on a CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--jsonl", default=None, help="append one JSON line per point here (default $OUT/timings.jsonl)")
    p.add_argument("--tag", default="timings", help="the 'step' field of every line")
    p.add_argument("--only", default=None, help="run the points whose name matches this glob")
    p.add_argument("--list", action="store_true", help="print the point names and exit")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: str, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> dict:
        """{"ms": median, "ms_min", "repeats"} of fn after the warm-up; calls over 0.5 s repeat 3 times."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        repeats = self.repeats
        while len(times) < repeats:
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if times[0] > 500:
                repeats = min(repeats, 3)
        return {"ms": statistics.median(times), "ms_min": min(times), "repeats": len(times)}


class Points:
    """The points in run order; each measures, returns its JSON fields, and may read earlier points
    (self.got) for its ratios."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.size = SIZES["quick" if args.quick else "full"]
        self.backends = (args.backends or ("cuda,triton" if self.device == "cuda" else "native")).split(",")
        self.timer = Timer(self.device, args.warmup, args.repeats)
        self.got: dict = {}
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32).to(dtype or self.dtype)

    def list(self):
        s, out = self.size, []
        out += [("limits/matmul", self.matmul), ("limits/copy", self.copy)]
        for k in s["lookup_k"]:
            for b in ["torch", *self.backends]:  # the peer first: the backends' lines carry the ratio
                out.append((f"lookup/K{k}/{b}", lambda k=k, b=b: self.lookup(k, b)))
        for b in self.backends:
            out.append((f"hrq/{b}", lambda b=b: self.hrq(b)))
        for k in s["ema_k"]:
            for b in self.backends:
                for det in (False, True):
                    out.append((f"ema_update/K{k}/{b}/{'det' if det else 'fast'}", lambda k=k, b=b, det=det: self.ema(k, b, det)))
        for b in self.backends:
            out.append((f"stem/{b}", lambda b=b: self.stem(b)))
        for b in self.backends:
            out.append((f"tokenize/vqdna-base/{b}", lambda b=b: self.tokenize("vqdna-base", b)))
        out.append(("tokenize/vqdna-small/auto", lambda: self.tokenize("vqdna-small", "auto")))
        out.append(("tokenize/agreement/vqdna-small", lambda: self.agreement("vqdna-small")))
        out.append(("mlm/" + s["mlm"][0], self.mlm))
        return out

    # -- limits ---------------------------------------------------------------------------------

    def matmul(self):
        n = self.size["matmul"]
        a, b = self.randn(n, n), self.randn(n, n)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            t = self.timer(lambda: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        tflops = 2 * n**3 / (t["ms"] * 1e-3) / 1e12
        self.got["peak_tflops"] = tflops
        return {"op": "matmul", "dtype": str(self.dtype)[6:], "shape": {"n": n}, **t, "tflops": tflops}

    def copy(self):
        src = torch.ones(self.size["copy"], device=self.device)
        dst = torch.empty_like(src)
        t = self.timer(lambda: dst.copy_(src))
        gbps = 2 * src.numel() * 4 / (t["ms"] * 1e-3) / 1e9
        self.got["peak_gbps"] = gbps
        return {"op": "copy", "dtype": "float32", "shape": {"numel": src.numel()}, **t, "gbps": gbps}

    # -- kernels --------------------------------------------------------------------------------

    def _lookup_inputs(self, k):
        key = ("lookup_inputs", k)
        if key not in self.got:
            n, d = self.size["n"], self.size["d"]
            if "z" not in self.got:
                self.got["z"] = self.randn(n, d)
            e = self.randn(k, d)
            self.got[key] = (self.got["z"], e, e.float().pow(2).sum(-1))
        return self.got[key]

    def _rate(self, op, backend, t, unit, amount, **extra):
        """A timed point: `amount` (FLOP or bytes) per t["ms"] in `unit` ("tflops" or "gbps"), and its
        fraction of the device limit of that unit measured in this run."""
        row = {"op": op, "backend": backend, "dtype": str(self.dtype)[6:], **extra, **t}
        row[unit] = amount / (t["ms"] * 1e-3) / (1e12 if unit == "tflops" else 1e9)
        if f"peak_{unit}" in self.got:
            row["fraction_of_peak"] = row[unit] / self.got[f"peak_{unit}"]
        return row

    def _compute(self, op, backend, flops, t, **extra):
        return self._rate(op, backend, t, "tflops", flops, **extra)

    def _memory(self, op, backend, nbytes, t, **extra):
        return self._rate(op, backend, t, "gbps", nbytes, **extra)

    def _ran(self, op, backend):
        assert last_backend(op) == backend, f"{op}: asked for {backend}, {last_backend(op)} ran"

    def lookup(self, k, backend):
        z, e, sq = self._lookup_inputs(k)
        n, d = z.shape
        if backend == "torch":
            chunk = max(1, (1 << 28) // k)  # rows per addmm: a score matrix of at most 2^28 elements
            sq_t = sq.to(z.dtype)

            def fn():
                for s in range(0, n, chunk):
                    torch.addmm(sq_t, z[s : s + chunk], e.T, alpha=-2).argmin(1)
        else:
            def fn():
                lookup(z, e, codebook_sqnorm=sq, backend=backend)

            fn()
            self._ran("lookup", backend)
        row = self._compute("lookup", backend, 2 * n * k * d, self.timer(fn), shape={"N": n, "K": k, "D": d})
        if backend == "torch":
            row["note"] = "torch.addmm(||e||^2, z, e^T, alpha=-2).argmin(1), bf16, rows chunked"
            self.got[("lookup-torch", k)] = row["ms"]
        elif ("lookup-torch", k) in self.got:
            row["speedup_vs_torch"] = self.got[("lookup-torch", k)] / row["ms"]
        if k == self.size["lookup_k"][1] and backend != "torch":
            self._target(row, ">= 0.70 of the matmul peak and >= 3x torch matmul+argmin",
                         row.get("fraction_of_peak", 0) >= 0.70 and row.get("speedup_vs_torch", 0) >= 3)
        return row

    def _target(self, row, text, met):
        """The issue's targets are for the GPU; a CPU run (a check of this script) records none."""
        if self.device == "cuda":
            row.update(target=text, met=bool(met))

    def hrq(self, backend):
        n, d = self.size["n"], self.size["d"]
        k0, k1 = self.size["hrq"]
        zs = [self.randn(n, d), self.randn(n, d)]
        cbs = [self.randn(k0, d), self.randn(k1, d)]
        sqs = [c.float().pow(2).sum(-1) for c in cbs]
        hrq_quantize(zs, cbs, codebook_sqnorms=sqs, backend=backend)
        self._ran("hrq_quantize", backend)
        t = self.timer(lambda: hrq_quantize(zs, cbs, codebook_sqnorms=sqs, backend=backend))
        plain = [self.timer(lambda z=z, c=c, s=s: lookup(z, c, codebook_sqnorm=s, backend=backend))["ms"]
                 for z, c, s in zip(zs, cbs, sqs)]
        row = self._compute("hrq_quantize", backend, 2 * n * d * (k0 + k1), t, shape={"N": n, "D": d, "K": [k0, k1]})
        row.update(lookups_ms=plain, ratio_to_lookups=row["ms"] / sum(plain))
        self._target(row, "<= 1.1x the two plain lookups", row["ratio_to_lookups"] <= 1.1)
        return row

    def ema(self, k, backend, det):
        n, d = self.size["n"], self.size["d"]
        x = self.got.get("z")
        x = x if x is not None else self.randn(n, d)
        codes = torch.randint(k, (n,), generator=self.gen, device=self.device, dtype=torch.int32)
        size = torch.ones(k, device=self.device)
        esum = torch.zeros(k, d, device=self.device)
        cb = torch.empty(k, d, dtype=self.dtype, device=self.device)
        fn = lambda: ema_update(x, codes, size, esum, cb, deterministic=det, backend=backend)  # noqa: E731
        fn()
        self._ran("ema_stats", backend)
        es = x.element_size()
        nbytes = n * d * es + 4 * n + 2 * 4 * k * (d + 1) + k * d * es
        row = self._memory("ema_update", backend, nbytes, self.timer(fn), shape={"N": n, "D": d, "K": k},
                           mode="deterministic" if det else "fast")
        self._target(row, ">= 0.70 of the copy bandwidth", row.get("fraction_of_peak", 0) >= 0.70)
        return row

    def stem(self, backend):
        b, length = self.size["stem"]
        d = self.size["d"]
        ids = torch.randint(0, 5, (b, length), generator=self.gen, device=self.device).to(torch.uint8)
        w = self.randn(d, 5, 5, dtype=torch.float32) / 5
        bias, lw, lb = (self.randn(d, dtype=torch.float32) for _ in range(3))
        fn = lambda: stem(ids, w, bias, lw, lb, out_dtype=self.dtype, backend=backend, check_ids=False)  # noqa: E731
        fn()
        self._ran("stem", backend)
        nbytes = b * length * (1 + d * torch.finfo(self.dtype).bits // 8)
        row = self._memory("stem", backend, nbytes, self.timer(fn), shape={"B": b, "L": length, "D": d, "W": 5})
        row["bases_per_s"] = b * length / (row["ms"] * 1e-3)
        row["note"] = "check_ids=False (no host sync)"
        return row

    # -- end to end -----------------------------------------------------------------------------

    def _model(self, name):
        from vqdna.models import VQDNATokenizerConfig, VQDNATokenizerModel
        from vqdna.models.tokenizer_model import bundled_tokenizers

        if ("model", name) not in self.got:
            if name in bundled_tokenizers():
                self.got[("model", name)] = (VQDNATokenizerModel.from_pretrained(name), "bundled")
            else:
                torch.manual_seed(0)
                self.got[("model", name)] = (VQDNATokenizerModel(VQDNATokenizerConfig.named(name)).eval(), "random weights")
        return self.got[("model", name)]

    def _fasta(self, bases):
        from bench.fasta import write_fasta

        path = os.path.join(self.tmp, f"in-{bases}.fa")
        if not os.path.exists(path):
            write_fasta(path, bases, min(bases, 1 << 24))
        return path

    def _tokenize(self, model, fasta, out, device, dtype, backend):
        import shutil

        from vqdna.streaming import tokenize_files

        shutil.rmtree(out, ignore_errors=True)
        old = os.environ.get("VQDNA_BACKEND")
        os.environ["VQDNA_BACKEND"] = backend  # every op of the model's forward takes this backend
        try:
            self.timer.sync()
            t0 = time.perf_counter()
            stats = tokenize_files([fasta], out, model, device=device, dtype=dtype)
            self.timer.sync()
            return time.perf_counter() - t0, stats
        finally:
            if old is None:
                os.environ.pop("VQDNA_BACKEND")
            else:
                os.environ["VQDNA_BACKEND"] = old

    def tokenize(self, name, backend):
        bases = self.size["bases"]
        if name == "vqdna-base" and self.device == "cpu":
            bases //= 8  # ~15 MFLOP a base: keep the CPU run to seconds
        model, weights = self._model(name)
        dtype = "bf16" if self.device == "cuda" else "fp32"
        warm = self._fasta(max(1 << 12, bases // 16))
        self._tokenize(model, warm, os.path.join(self.tmp, "warm"), self.device, dtype, backend)
        seconds, stats = self._tokenize(model, self._fasta(bases), os.path.join(self.tmp, "tok"), self.device, dtype, backend)
        row = {"op": "tokenize", "backend": backend, "dtype": dtype, "model": f"{name} ({weights})",
               "shape": {"bases": bases}, "ms": seconds * 1e3, "repeats": 1, "bases_per_s": bases / seconds,
               "read_s": stats.read_s, "compute_s": stats.compute_s, "write_s": stats.write_s}
        if name == "vqdna-base":
            self._target(row, ">= 20 M bases/s end to end (vqdna-base, bf16, one H200)", row["bases_per_s"] >= TOKENIZE_TARGET)
        return row

    def agreement(self, name):
        """Codes of the device path (bf16 on a GPU) against the CPU float32 path on the same FASTA."""
        import numpy as np

        from vqdna.data import TokenDataset

        model, weights = self._model(name)
        fasta = self._fasta(self.size["agree_bases"])
        dtype = "bf16" if self.device == "cuda" else "fp32"
        self._tokenize(model, fasta, os.path.join(self.tmp, "agree-dev"), self.device, dtype, "auto")
        self._tokenize(model, fasta, os.path.join(self.tmp, "agree-cpu"), "cpu", "fp32", "auto")
        a, b = TokenDataset(os.path.join(self.tmp, "agree-dev")), TokenDataset(os.path.join(self.tmp, "agree-cpu"))
        same, total = None, 0
        for i in range(len(a)):
            ca, cb = np.asarray(a[i][1]), np.asarray(b[i][1])
            assert ca.shape == cb.shape, f"record {i}: {ca.shape} codes on {self.device}, {cb.shape} on the CPU"
            eq = (ca == cb).sum(0)
            same = eq if same is None else same + eq
            total += len(ca)
        return {"op": "tokenize-agreement", "backend": "auto", "dtype": dtype, "model": f"{name} ({weights})",
                "shape": {"bases": self.size["agree_bases"]}, "agreement_per_level": [float(s / total) for s in same],
                "note": "fraction of positions whose code equals the CPU float32 path's; bf16 flips near-ties"}

    def mlm(self):
        from vqdna.models.bert import VQDNAConfig, VQDNAForMaskedLM
        from vqdna.train.pretrain import mask_tokens

        name, batch, length = self.size["mlm"]
        sizes = [64, 512]
        config = VQDNAConfig.named(name, codebook_sizes=sizes, codebook_dim=self.size["d"], attention_backend="sdpa")
        model = VQDNAForMaskedLM(config).to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
        gen = torch.Generator(device=self.device).manual_seed(1)
        codes = torch.stack([torch.randint(k, (batch, length), generator=gen, device=self.device) for k in sizes], -1)
        ids, labels = mask_tokens(codes, sizes, 0.25)
        autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")

        def step():
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = self.timer(step)
        return {"op": "mlm-pretrain", "backend": "sdpa", "dtype": "bf16-autocast" if self.device == "cuda" else "float32",
                "model": name, "shape": {"batch": batch, "tokens": length}, **t, "steps_per_s": 1e3 / t["ms"],
                "note": "one optimizer step (forward, backward, AdamW), random codes, 25% masked"}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_timings: torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    path = args.jsonl or os.path.join(os.environ.get("OUT", "."), "timings.jsonl")
    points = Points(args)
    todo = [(n, f) for n, f in points.list() if not args.only or fnmatch.fnmatch(n, args.only)]
    if args.list:
        print("\n".join(n for n, _ in todo))
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="vqdna-timings-") as tmp:
        points.tmp = tmp
        for name, fn in todo:
            t0 = time.perf_counter()
            try:
                row = {"status": "pass", **fn()}
            except Exception as exc:  # noqa: BLE001  (each point is isolated)
                failed += 1
                row = {"status": "fail", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            row = {"kind": "timing", "step": args.tag, "point": name, "device": args.device, **row,
                   "seconds": round(time.perf_counter() - t0, 3)}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("kind", "step", "traceback")}
            print(json.dumps(shown), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"gpu_timings: {len(todo) - failed} points measured, {failed} failed ({path})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
