"""The benchmark cases: every op x backend x dtype over the sizes that matter, with the peers a user
would pick. Shared by `vqdna bench` and the pytest suite (bench/ in the repository).

Sizes: "tiny" (seconds on a CPU; tests), "small" (a CPU run of a few minutes), "full" (VQ K=512,
HRQ 64/512, large K 4096 / 24576 / 65536, N from 2^10 to 2^24: meant for a GPU; on the CPU the
cases above a work budget are left out and said so).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from vqdna.kernels.dispatch import BACKENDS, _why_unavailable

SIZES = ("tiny", "small", "full")
OPS = ("lookup", "hrq_quantize", "ema_update", "kmeans", "VectorQuantizer", "stem", "tokenizer-encode")
HRQ_SIZES = (64, 512)

# Per size: (D, N sweep at the reference K, reference K, K sweep, N of the K sweep).
_LOOKUP_GRID = {
    "tiny": (64, [1024, 4096], 512, [64, 2048], 1024),
    "small": (384, [1024, 8192, 65536], 512, [64, 4096, 24576, 65536], 4096),
    "full": (384, [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 24], 512, [64, 4096, 24576, 65536], 1 << 20),
}
_ROWS = {"tiny": [1024, 4096], "small": [1024, 16384, 65536], "full": [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 24]}
_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}

# CPU work budgets (FLOPs of one call): larger cases are left out of a CPU run (2e12 FLOP is ~15 s
# at this machine's float32 GEMM peak), the reference above 3e11, torch's bf16 addmm (far slower
# on the CPU) above 5e10.
_CPU_CASE_FLOPS = 2e12
_CPU_REF_FLOPS = 3e11
_CPU_TORCH_BF16_FLOPS = 5e10
# Peers that materialise the N x K distance matrix are skipped above this many bytes of it.
_MATERIALISE_BYTES = {"cpu": 2 << 30, "cuda": 16 << 30}


@dataclass
class Impl:
    name: str
    fn: Callable[[], object]
    kind: str = "backend"  # "backend" (one of vqdna's) or "peer"
    rounds: Optional[int] = None  # None: the run's default


@dataclass
class Case:
    """One measured problem. setup() builds the inputs on the device and returns the implementations
    to time (inputs live only as long as the returned list)."""

    op: str
    device: str
    dtype: torch.dtype
    shape: dict
    setup: Callable[[], list]
    flops: Optional[float] = None
    bytes_moved: Optional[float] = None
    bases: Optional[int] = None
    # The dispatched op and (N, K) coordinates for the measured backend table (None: not a table op).
    table: Optional[dict] = None
    skipped: list = field(default_factory=list)  # "impl: reason" for what was left out
    impl_names: list = field(default_factory=list)  # what setup() returns, known without building inputs

    @property
    def id(self) -> str:
        dims = "-".join(
            str(v) if isinstance(v, str) else f"{k}{'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in self.shape.items()
        )
        return f"{self.op}-{self.device}-{str(self.dtype)[6:]}-{dims}"


def backends_for(op: str, device: str) -> list[str]:
    """vqdna backends that can run `op` on `device` here. Triton on CPU tensors runs in the
    interpreter (a correctness tool, not a fast path) and is not benchmarked."""
    dev = torch.device(device)
    return [b for b in BACKENDS if _why_unavailable(b, dev, op) is None and not (b == "triton" and dev.type == "cpu")]


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _near_codes(n: int, k: int, d: int, dtype, device: str, seed: int):
    """Codebook ~ N(0, 1) and rows near random codes (the realistic case), built on the device."""
    gen = _gen(device, seed)
    codebook = torch.randn(k, d, generator=gen, device=device)
    z = codebook[torch.randint(k, (n,), generator=gen, device=device)]
    z.add_(torch.randn(n, d, generator=gen, device=device), alpha=0.5)
    return z.to(dtype), codebook.to(dtype)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cpu_budget(device: str, flops: float, limit: float) -> bool:
    return torch.device(device).type != "cpu" or flops <= limit


# ---------------------------------------------------------------------------------------------
# lookup


def _lookup_case(n, k, d, dtype, device) -> Case:
    from vqdna.kernels import lookup

    flops = 2.0 * n * k * d
    case = Case("lookup", device, dtype, {"N": n, "K": k, "D": d}, None, flops=flops, table={"op": "lookup", "N": n, "K": k})
    backends = backends_for("lookup", device)
    if not _cpu_budget(device, flops, _CPU_REF_FLOPS) and "reference" in backends:
        backends.remove("reference")
        case.skipped.append("reference: above the CPU reference budget")
    torch_ok = n * k * 4 <= _MATERIALISE_BYTES[torch.device(device).type]
    if not torch_ok:
        case.skipped.append("torch: the N x K matrix it builds is too large here")
    elif dtype != torch.float32 and not _cpu_budget(device, flops, _CPU_TORCH_BF16_FLOPS):
        torch_ok = False
        case.skipped.append("torch: above the CPU budget for its half-precision GEMM")
    faiss_ok = torch.device(device).type == "cpu" and dtype == torch.float32 and _has("faiss")
    case.impl_names = [*backends, *(["torch"] if torch_ok else []), *(["faiss"] if faiss_ok else [])]

    def setup():
        z, codebook = _near_codes(n, k, d, dtype, device, seed=k + n)
        sq = codebook.float().pow(2).sum(-1)
        impls = [
            Impl(b, (lambda b=b: lookup(z, codebook, codebook_sqnorm=sq, backend=b)), rounds=2 if b == "reference" else None)
            for b in backends
        ]
        if torch_ok:
            sq_t = sq.to(dtype)
            impls.append(Impl("torch", lambda: torch.addmm(sq_t, z, codebook.T, alpha=-2).argmin(1), kind="peer"))
        if faiss_ok:
            import faiss

            index = faiss.IndexFlatL2(d)
            index.add(codebook.numpy())
            zn = z.numpy()
            impls.append(Impl("faiss", lambda: index.search(zn, 1), kind="peer"))
        return impls

    case.setup = setup
    return case


def lookup_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    d, ns, k_ref, ks, n_of_ks = _LOOKUP_GRID[size]
    points = [(n, k_ref) for n in ns] + [(n_of_ks, k) for k in ks if k != k_ref]
    for dtype in dtypes:
        for n, k in points:
            yield _lookup_case(n, k, d, dtype, device)


# ---------------------------------------------------------------------------------------------
# hrq_quantize


def hrq_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import hrq_quantize, lookup

    d = _LOOKUP_GRID[size][0]
    for dtype in dtypes:
        for n in _ROWS[size]:
            flops = 2.0 * n * d * sum(HRQ_SIZES)
            case = Case("hrq_quantize", device, dtype, {"N": n, "D": d, "K": list(HRQ_SIZES)}, None, flops=flops,
                        table={"op": "hrq_quantize", "N": n, "K": sum(HRQ_SIZES)})
            backends = backends_for("hrq_quantize", device)
            if not _cpu_budget(device, flops, _CPU_REF_FLOPS):
                backends = [b for b in backends if b != "reference"]
                case.skipped.append("reference: above the CPU reference budget")
            torch_ok = dtype == torch.float32 or _cpu_budget(device, flops, _CPU_TORCH_BF16_FLOPS)
            fast = next((b for b in backends if b != "reference"), None)
            reuse = "native" in backends  # out= buffers reused across calls: no fresh-page cost per call
            case.impl_names = [*backends, *(["native (out=)"] if reuse else []), *([f"2x lookup ({fast})"] if fast else []),
                               *(["torch"] if torch_ok else [])]

            def setup(n=n, dtype=dtype, backends=backends, torch_ok=torch_ok, fast=fast, reuse=reuse):
                gen = _gen(device, n)
                cbs = [torch.randn(k, d, generator=gen, device=device).to(dtype) for k in HRQ_SIZES]
                zs = [torch.randn(n, d, generator=gen, device=device).to(dtype) for _ in HRQ_SIZES]
                impls = [
                    Impl(b, (lambda b=b: hrq_quantize(zs, cbs, backend=b)), rounds=2 if b == "reference" else None)
                    for b in backends
                ]
                if reuse:
                    out = (torch.empty(len(HRQ_SIZES), n, dtype=torch.int32), torch.empty(len(HRQ_SIZES), n, d, dtype=dtype))
                    impls.append(Impl("native (out=)", lambda: hrq_quantize(zs, cbs, backend="native", out=out), kind="variant"))
                if fast is not None:
                    # The cost floor of fused HRQ: the two plain lookups it contains, H_2 given free.
                    h2 = 2 * zs[1] - cbs[0][torch.randint(HRQ_SIZES[0], (n,), generator=gen, device=device)]
                    impls.append(Impl(f"2x lookup ({fast})", lambda: (lookup(zs[0], cbs[0], backend=fast), lookup(h2, cbs[1], backend=fast)), kind="peer"))
                if torch_ok:
                    sqs = [c.float().pow(2).sum(-1).to(dtype) for c in cbs]

                    def torch_hrq():
                        m1 = torch.addmm(sqs[0], zs[0], cbs[0].T, alpha=-2).argmin(1)
                        h = 2 * zs[1] - cbs[0][m1]
                        m2 = torch.addmm(sqs[1], h, cbs[1].T, alpha=-2).argmin(1)
                        return m1, m2, (cbs[0][m1] + cbs[1][m2]) / 2

                    impls.append(Impl("torch", torch_hrq, kind="peer"))
                return impls

            case.setup = setup
            yield case


# ---------------------------------------------------------------------------------------------
# ema_update (memory-bound: bytes = x read once, codes read once, EMA state read and written)


def ema_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import ema_update

    d = _LOOKUP_GRID[size][0]
    points = [(n, 512) for n in _ROWS[size]] + [(_ROWS[size][-1], k) for k in ((4096,) if size == "tiny" else (4096, 65536))]
    for dtype in dtypes:
        for n, k in points:
            elt = torch.empty((), dtype=dtype).element_size()
            moved = n * d * elt + 4 * n + k * (d + 1) * 4 * 2 * 2 + k * d * elt
            case = Case("ema_update", device, dtype, {"N": n, "D": d, "K": k}, None, bytes_moved=moved,
                        table={"op": "ema_stats", "N": n, "K": k})
            backends = backends_for("ema_stats", device)
            case.impl_names = [n for b in backends for n in (b, f"{b} (deterministic)")] + ["torch index_add_"]

            def setup(n=n, k=k, dtype=dtype, backends=backends):
                gen = _gen(device, n + k)
                x = torch.randn(n, d, generator=gen, device=device).to(dtype)
                codes = torch.randint(k, (n,), generator=gen, device=device, dtype=torch.int32)
                state = [torch.ones(k, device=device), torch.zeros(k, d, device=device), torch.zeros(k, d, device=device, dtype=dtype)]
                impls = []
                for b in backends:
                    for det in (False, True):
                        name = b if not det else f"{b} (deterministic)"
                        impls.append(Impl(name, (lambda b=b, det=det: ema_update(x, codes, *state, deterministic=det, backend=b)),
                                          kind="backend" if not det else "variant"))
                codes64 = codes.long()
                ones = torch.ones(n, device=device)

                def torch_ema():
                    counts = torch.zeros(k, device=device).index_add_(0, codes64, ones)
                    sums = torch.zeros(k, d, device=device).index_add_(0, codes64, x.float())
                    state[0].mul_(0.99).add_(counts, alpha=0.01)
                    state[1].mul_(0.99).add_(sums, alpha=0.01)
                    total = state[0].sum()
                    smoothed = (state[0] + 1e-5) / (total + k * 1e-5) * total
                    state[2].copy_(state[1] / smoothed[:, None])

                impls.append(Impl("torch index_add_", torch_ema, kind="peer"))
                return impls

            case.setup = setup
            yield case


# ---------------------------------------------------------------------------------------------
# kmeans (assignment-bound: iters x 2 N K D FLOPs)


def kmeans_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import kmeans

    iters = 5
    d = _LOOKUP_GRID[size][0]
    points = {"tiny": [(4096, 64)], "small": [(16384, 512), (65536, 512)], "full": [(1 << 16, 512), (1 << 20, 512), (1 << 20, 4096)]}[size]
    for dtype in dtypes:
        if dtype != torch.float32:
            continue  # k-means runs on float32 features (codebook initialisation)
        for n, k in points:
            flops = iters * 2.0 * n * k * d
            case = Case("kmeans", device, dtype, {"N": n, "D": d, "K": k, "iters": iters}, None, flops=flops)
            backends = backends_for("lookup", device)
            if not _cpu_budget(device, flops, _CPU_REF_FLOPS):
                backends = [b for b in backends if b != "reference"]
                case.skipped.append("reference: above the CPU reference budget")

            faiss_ok = torch.device(device).type == "cpu" and _has("faiss")
            case.impl_names = [*backends, *(["faiss"] if faiss_ok else [])]

            def setup(n=n, k=k, backends=backends, faiss_ok=faiss_ok):
                x, _ = _near_codes(n, k, d, torch.float32, device, seed=n + k)
                impls = [Impl(b, (lambda b=b: kmeans(x, k, iters, init="random", backend=b)), rounds=2 if b == "reference" else 3) for b in backends]
                if faiss_ok:
                    import faiss

                    xn = x.numpy()

                    def faiss_kmeans():
                        km = faiss.Kmeans(d, k, niter=iters, seed=0, max_points_per_centroid=1 << 30, spherical=False)
                        km.train(xn)

                    impls.append(Impl("faiss", faiss_kmeans, kind="peer", rounds=3))
                return impls

            case.setup = setup
            yield case


# ---------------------------------------------------------------------------------------------
# VectorQuantizer module against vector-quantize-pytorch


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def module_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna import VectorQuantizer

    d, k = _LOOKUP_GRID[size][0], 512
    n = {"tiny": 4096, "small": 65536, "full": 1 << 20}[size]
    for mode in ("eval", "train"):
        case = Case(f"VectorQuantizer-{mode}", device, torch.float32, {"N": n, "D": d, "K": k}, None, flops=2.0 * n * k * d)
        case.impl_names = ["vqdna", "reference", *(["vector-quantize-pytorch"] if _has("vector_quantize_pytorch") else [])]

        def setup(mode=mode, case=case):
            x = torch.randn(n, d, generator=_gen(device, 2), device=device)
            impls = []
            for name, backend in (("vqdna", None), ("reference", "reference")):
                module = VectorQuantizer(dim=d, codebook_size=k).to(device).train(mode == "train")

                def step(module=module, backend=backend):
                    with torch.no_grad(), _env("VQDNA_BACKEND", backend):
                        module(x)

                impls.append(Impl(name, step, rounds=2 if backend else None))
            if "vector-quantize-pytorch" in case.impl_names:
                from vector_quantize_pytorch import VectorQuantize

                peer = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.5).to(device).train(mode == "train")

                def peer_step():
                    with torch.no_grad():
                        peer(x[None])  # it expects [B, N, D]

                impls.append(Impl("vector-quantize-pytorch", peer_step, kind="peer"))
            return impls

        case.setup = setup
        yield case


# ---------------------------------------------------------------------------------------------
# stem (memory-bound: ids read once, [N, D] features written once)


def stem_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna.kernels import ops

    if not hasattr(ops, "stem"):
        left_out.append("stem: this build has no vqdna.kernels stem op")
        return
    d = _LOOKUP_GRID[size][0]
    rows = {"tiny": [(1, 4096)], "small": [(8, 4096), (64, 4096)], "full": [(16, 4096), (256, 4096), (1024, 16384)]}[size]
    for dtype in dtypes:
        for b, length in rows:
            n = b * length
            elt = torch.empty((), dtype=dtype).element_size()
            case = Case("stem", device, dtype, {"B": b, "L": length, "D": d}, None, bytes_moved=n + n * d * elt,
                        table={"op": "stem", "N": n, "K": d})
            backends = backends_for("stem", device)
            case.impl_names = [*backends, "torch"]

            def setup(b=b, length=length, dtype=dtype, backends=backends):
                gen = _gen(device, b)
                ids = torch.randint(5, (b, length), generator=gen, device=device, dtype=torch.uint8)
                w = torch.randn(d, 5, 5, generator=gen, device=device) / 5
                bias, lw, lb = (torch.randn(d, generator=gen, device=device) for _ in range(3))
                args = [t.to(dtype) for t in (w, bias, lw, lb)]
                impls = [Impl(bk, (lambda bk=bk: ops.stem(ids, *args, out_dtype=dtype, backend=bk)),
                              rounds=2 if bk == "reference" else None) for bk in backends]

                def torch_stem():  # what a user writes: Conv1d over the one-hot, LayerNorm, GELU
                    x = torch.nn.functional.one_hot(ids.long(), 6)[..., :5].transpose(1, 2).to(dtype)
                    y = torch.nn.functional.conv1d(x, args[0], args[1], padding=2).transpose(1, 2)
                    return torch.nn.functional.gelu(torch.nn.functional.layer_norm(y, (d,), args[2], args[3], 1e-6))

                impls.append(Impl("torch", torch_stem, kind="peer"))
                return impls

            case.setup = setup
            yield case


# ---------------------------------------------------------------------------------------------
# tokenizer encode (end to end: ids -> codes through the encoder and HRQ; bases_per_s)


def encode_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    if not _has("vqdna.models.tokenizer_model"):
        left_out.append("tokenizer-encode: this build has no vqdna.models.tokenizer_model")
        return
    from vqdna.models.tokenizer_model import VQDNATokenizerConfig, VQDNATokenizerModel

    # (config, B, L): the base model is ~15 MFLOP a base, so the CPU sizes stay small.
    points = {
        "tiny": [("vqdna-small", 2, 1024)],
        "small": [("vqdna-small", 16, 4096), ("vqdna-base", 2, 4096)],
        "full": [("vqdna-small", 64, 16384), ("vqdna-base", 64, 16384)],
    }[size]
    for dtype in dtypes:
        if dtype != torch.float32:
            continue  # the model runs in float32 (its autocast is the user's)
        for name, b, length in points:
            case = Case("tokenizer-encode", device, dtype, {"config": name, "B": b, "L": length}, None, bases=b * length)
            case.impl_names = ["vqdna", "reference"]

            def setup(name=name, b=b, length=length):
                model = VQDNATokenizerModel(VQDNATokenizerConfig.named(name)).to(device).eval()
                ids = torch.randint(5, (b, length), generator=_gen(device, 3), device=device)
                impls = []
                for impl, backend in (("vqdna", None), ("reference", "reference")):
                    def encode(backend=backend):
                        with torch.no_grad(), _env("VQDNA_BACKEND", backend):
                            model.encode(ids)

                    impls.append(Impl(impl, encode, rounds=2 if backend else 3))
                return impls

            case.setup = setup
            yield case


_BUILDERS = {
    "lookup": lookup_cases,
    "hrq_quantize": hrq_cases,
    "ema_update": ema_cases,
    "kmeans": kmeans_cases,
    "VectorQuantizer": module_cases,
    "stem": stem_cases,
    "tokenizer-encode": encode_cases,
}


def cases(ops=None, device: str = "cpu", size: str = "small", dtypes=None) -> Iterator[Case]:
    """The cases of `ops` (default: all) on `device` at `size`, in `dtypes` (default: per device).
    On the CPU, cases above the work budget are left out (listed by `left_out`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    ops = list(ops or OPS)
    for op in ops:
        if op not in _BUILDERS:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(_BUILDERS)}")
    dev_type = torch.device(device).type
    dtypes = tuple(dtypes or _DTYPES.get(dev_type, (torch.float32,)))
    for op in ops:
        for case in _BUILDERS[op](device, size, dtypes):
            if case.flops is not None and not _cpu_budget(device, case.flops, _CPU_CASE_FLOPS):
                left_out.append(f"{case.id}: above the CPU work budget ({case.flops:.2g} FLOP)")
                continue
            yield case


left_out: list[str] = []


from vqdna.bench.encode_rate import encode_rate_cases  # noqa: E402  (it builds on Case above)

OPS, _BUILDERS["encode-rate"] = OPS + ("encode-rate",), encode_rate_cases
