"""The benchmark cases: every op x backend x dtype over the sizes that matter, with the peers a user
would pick. Shared by `vqdna bench` and the pytest suite (bench/ in the repository).

Sizes: "tiny" (seconds on a CPU; tests), "small" (a CPU run of a few minutes), "full" (VQ K=512,
HRQ 64/512, large K 4096 / 24576 / 65536, N from 2^10 to 2^24: meant for a GPU; on the CPU the
cases above a work budget are left out and said so).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from vqdna.kernels.dispatch import BACKENDS, _why_unavailable

SIZES = ("tiny", "small", "full")
HRQ_SIZES = (64, 512)

# Per size: (D, N sweep at the reference K, reference K, K sweep, N of the K sweep).
LOOKUP_GRID = {
    "tiny": (64, [1024, 4096], 512, [64, 2048], 1024),
    "small": (384, [1024, 8192, 65536], 512, [64, 4096, 24576, 65536], 4096),
    "full": (384, [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 24], 512, [64, 4096, 24576, 65536], 1 << 20),
}
ROWS = {"tiny": [1024, 4096], "small": [1024, 16384, 65536], "full": [1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 24]}
_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}

# CPU work budgets (FLOPs of one call): larger cases are left out of a CPU run (2e12 FLOP is ~15 s
# at this machine's float32 GEMM peak), the reference above 3e11, torch's bf16 addmm (far slower
# on the CPU) above 5e10.
CPU_CASE_FLOPS = 2e12
CPU_REF_FLOPS = 3e11
CPU_TORCH_BF16_FLOPS = 5e10
# Peers that materialise the N x K distance matrix are skipped above this many bytes of it.
MATERIALISE_BYTES = {"cpu": 2 << 30, "cuda": 16 << 30}

# What the last cases() call left out, and why (the builders append to it).
left_out: list[str] = []


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


def generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def near_codes(n: int, k: int, d: int, dtype, device: str, seed: int):
    """Codebook ~ N(0, 1) and rows near random codes (the realistic case), built on the device."""
    gen = generator(device, seed)
    codebook = torch.randn(k, d, generator=gen, device=device)
    z = codebook[torch.randint(k, (n,), generator=gen, device=device)]
    z.add_(torch.randn(n, d, generator=gen, device=device), alpha=0.5)
    return z.to(dtype), codebook.to(dtype)


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpu_budget(device: str, flops: float, limit: float) -> bool:
    return torch.device(device).type != "cpu" or flops <= limit


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

    d, k = LOOKUP_GRID[size][0], 512
    n = {"tiny": 4096, "small": 65536, "full": 1 << 20}[size]
    for mode in ("eval", "train"):
        case = Case(f"VectorQuantizer-{mode}", device, torch.float32, {"N": n, "D": d, "K": k}, None, flops=2.0 * n * k * d)
        case.impl_names = ["vqdna", "reference", *(["vector-quantize-pytorch"] if has_module("vector_quantize_pytorch") else [])]

        def setup(mode=mode, case=case):
            x = torch.randn(n, d, generator=generator(device, 2), device=device)
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


# One case per vector-quantize-pytorch option (issue 23): VectorQuantizer and the peer built with the
# same options, the same weights (from_vector_quantize) and the same input, eval and training forward.
# The peer's defaults that differ from ours (decay 0.8, commitment weight 1, rotation trick) are moved
# over with the state, so both run the same configuration.
MODULE_OPTIONS = {
    "plain": dict(rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "heads4": dict(heads=4, codebook_dim=64),
    "separate_heads4": dict(heads=4, codebook_dim=64, separate_codebook_per_head=True),
    "codebook_dim64": dict(codebook_dim=64),
    "rotation_trick": dict(rotation_trick=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "frozen": dict(freeze_codebook=True),
    "orthogonal": dict(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=1024),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "channel_first": dict(channel_last=False),
    "mask": dict(return_zeros_for_masked_padding=True),
}
# Per size: N and the (K, D) points.
_OPTION_GRID = {
    "tiny": (4096, [(512, 64)]),
    "small": (65536, [(512, 256), (8192, 384)]),
    "full": (65536, [(k, d) for k in (512, 8192) for d in (256, 384)]),
}


def option_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    from vqdna import VectorQuantizer

    n_rows, points = _OPTION_GRID[size]
    for (k, d), (option, kwargs), mode in (
        (p, o, m) for p in points for o in MODULE_OPTIONS.items() for m in ("eval", "train")
    ):
        # With H heads every row is H searches: N / H rows keep the N searches of the other cases (and the
        # peer's [N H, K] float32 distances, 8.6 GB at N = 65536, H = 4, K = 8192, within a 24 GB machine,
        # where N rows ran it out of memory).
        n = n_rows // kwargs.get("heads", 1)
        case = Case(f"VectorQuantizer-{option}-{mode}", device, torch.float32, {"N": n, "D": d, "K": k}, None,
                    flops=2.0 * n * kwargs.get("heads", 1) * k * kwargs.get("codebook_dim", d))  # the search's
        case.impl_names = ["vqdna", *(["vector-quantize-pytorch"] if has_module("vector_quantize_pytorch") else [])]

        def setup(mode=mode, kwargs=kwargs, n=n, k=k, d=d, option=option):
            torch.manual_seed(0)
            mask = None
            if option == "channel_first":
                x = torch.randn(1, d, n, generator=generator(device, 2), device=device)
            else:
                x = torch.randn(1, n, d, generator=generator(device, 2), device=device)
            if option == "mask":
                mask = torch.arange(n, device=device)[None] < n - n // 8
            impls = []
            if has_module("vector_quantize_pytorch"):
                from vector_quantize_pytorch import VectorQuantize

                peer = VectorQuantize(dim=d, codebook_size=k, **kwargs).to(device).train(mode == "train")
                ours = VectorQuantizer.from_vector_quantize(peer).train(mode == "train")
            else:
                ours = VectorQuantizer(dim=d, codebook_size=k, **kwargs).to(device).train(mode == "train")
                peer = None

            def step(module):
                with torch.no_grad():
                    module(x, mask=mask)

            impls.append(Impl("vqdna", lambda: step(ours)))
            if peer is not None:
                impls.append(Impl("vector-quantize-pytorch", lambda: step(peer), kind="peer", rounds=2))
            return impls

        case.setup = setup
        yield case


# ---------------------------------------------------------------------------------------------
# tokenizer encode (end to end: ids -> codes through the encoder and HRQ; bases_per_s)


def encode_cases(device: str, size: str, dtypes) -> Iterator[Case]:
    if not has_module("vqdna.models.tokenizer_model"):
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
                ids = torch.randint(5, (b, length), generator=generator(device, 3), device=device)
                impls = []
                for impl, backend in (("vqdna", None), ("reference", "reference")):
                    def encode(backend=backend):
                        with torch.no_grad(), _env("VQDNA_BACKEND", backend):
                            model.encode(ids)

                    impls.append(Impl(impl, encode, rounds=2 if backend else 3))
                return impls

            case.setup = setup
            yield case


@functools.cache
def _builders() -> dict[str, Callable[..., Iterator[Case]]]:
    """Bench op name -> its case builder: every op's declaration names its own (bench=, in its folder
    vqdna/kernels/ops/<op>/bench.py), in registry order, then the module-level cases. Resolved on
    first use: those builders import this module."""
    from vqdna.kernels.ops.registry import declarations

    builders = {}
    for decl in declarations().values():
        if decl.bench is not None:
            name, where = decl.bench
            module, function = where.split(":")
            builders[name] = getattr(importlib.import_module(module), function)
    from vqdna.bench.encode_rate import encode_rate_cases
    from vqdna.bench.tokenize_rate import tokenize_rate_cases

    return {**builders, "VectorQuantizer": module_cases, "VectorQuantizer-options": option_cases, "tokenizer-encode": encode_cases,
            "encode-rate": encode_rate_cases, "tokenize-rate": tokenize_rate_cases}


def __getattr__(name: str):
    if name == "OPS":  # every op the bench measures: the declared ops' bench names, then the modules
        return tuple(_builders())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cases(ops=None, device: str = "cpu", size: str = "small", dtypes=None) -> Iterator[Case]:
    """The cases of `ops` (default: all) on `device` at `size`, in `dtypes` (default: per device).
    On the CPU, cases above the work budget are left out (listed by `left_out`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    builders = _builders()
    ops = list(ops or builders)
    for op in ops:
        if op not in builders:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(builders)}")
    dev_type = torch.device(device).type
    dtypes = tuple(dtypes or _DTYPES.get(dev_type, (torch.float32,)))
    for op in ops:
        for case in builders[op](device, size, dtypes):
            if case.flops is not None and not cpu_budget(device, case.flops, CPU_CASE_FLOPS):
                left_out.append(f"{case.id}: above the CPU work budget ({case.flops:.2g} FLOP)")
                continue
            yield case
