"""Op declarations, and everything derived from them: the torch.library registration of every
backend op (`vqdna::<op>_<backend>`), their fake (meta) functions and autograd formulas, which
backends an op has (for dispatch and the tests), and the benchmark cases.

One op = one folder, vqdna/kernels/ops/<op>/: `declaration.py` (an `OpDeclaration` named
DECLARATION), `wrapper.py` (the public function: validation, dispatch), `triton_kernel.py` and
`bench.py`; its C++/CUDA sources are csrc/ops/<op>/. vqdna/kernels/ops/__init__.py lists the ops,
one line each. docs/adding-an-op.md is the checklist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from vqdna import _ext

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The compiled backends (vqdna._C, csrc/ops/<op>/) and the dispatch key each registers its kernel on.
COMPILED_DISPATCH_KEYS = {"native": "CPU", "cuda": "CUDA"}


@dataclass(frozen=True)
class OpDeclaration:
    """What defines an op; registration, dispatch, the tests and the bench derive from it.

    name: the op (torch ops `vqdna::<name>_<backend>`).
    reference: the body of `vqdna::<name>_reference`, a call of the function of reference.py (the
        spec); its type annotations give the schema every backend op shares. None for a composite
        (an op built from other ops, e.g. kmeans), which registers no torch op of its own.
    fake: output shapes and dtypes from the inputs' (the meta function), shared by every backend op.
    compiled: backends with a kernel in vqdna._C (csrc/ops/<name>/cpu.cpp: "native", cuda.cu: "cuda").
    triton: the module defining `<name>_triton` (a torch.library.triton_op), imported on first use.
    autograd: (backward, setup_context) for torch.library.register_autograd, or None (not differentiable).
    compiled_extras: further vqdna._C ops of this op, name -> (backend, fake) (e.g. an out= variant).
    bench: (the bench's name for the op, "module:function" yielding its cases), or None.
    uses: for a composite, the declared ops it calls: it runs on the backends they all have.
    """

    name: str
    reference: Optional[Callable] = None
    fake: Optional[Callable] = None
    compiled: tuple[str, ...] = ("native", "cuda")
    triton: Optional[str] = None
    autograd: Optional[tuple[Callable, Callable]] = None
    compiled_extras: dict = field(default_factory=dict)
    bench: Optional[tuple[str, str]] = None
    uses: tuple[str, ...] = ()

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends that run this op, in BACKENDS order: those with a kernel for it, or for a
        composite those every op it uses has."""
        if self.reference is None:
            have = set.intersection(*(set(_declarations[u].backends) for u in self.uses)) if self.uses else set()
        else:
            have = {"reference", *self.compiled, *(["triton"] if self.triton else [])}
        return tuple(b for b in ("cuda", "triton", "native", "reference") if b in have)


_declarations: dict[str, OpDeclaration] = {}
# (op, backend) -> the registered op, its fake and autograd formula registered.
_ops: dict[tuple[str, str], Callable] = {}


def has_kernel(op: str, backend: str) -> bool:
    """True when vqdna._C registered a kernel for `vqdna::<op>_<backend>` (native: CPU, cuda: CUDA)."""
    if not _ext.extension_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"vqdna::{op}_{backend}", COMPILED_DISPATCH_KEYS[backend])
    except RuntimeError:  # the schema is unknown to this (older) build
        return False


def register(names: Iterable[str]) -> dict[str, OpDeclaration]:
    """Import vqdna/kernels/ops/<name>/declaration.py of every name and register its torch ops: the
    reference op, and the fakes and autograd of the compiled ops this build of vqdna._C has. (Triton
    ops register on first use: importing Triton costs seconds. Registering while torch.compile
    traces a call is not allowed, hence everything else here, at import.)"""
    for name in names:
        decl = importlib.import_module(f"vqdna.kernels.ops.{name}.declaration").DECLARATION
        if decl.name != name:
            raise AssertionError(f"vqdna/kernels/ops/{name}/declaration.py declares {decl.name!r}")
        _declarations[name] = decl
        if decl.reference is None:
            continue
        ref = torch.library.custom_op(f"vqdna::{name}_reference", mutates_args=())(decl.reference)
        _finish("reference", decl, ref)
        for backend in decl.compiled:
            if has_kernel(name, backend):
                _finish(backend, decl, getattr(torch.ops.vqdna, f"{name}_{backend}"))
                for extra, (extra_backend, fake) in decl.compiled_extras.items():
                    if extra_backend == backend:
                        torch.library.register_fake(f"vqdna::{extra}")(fake)
    return dict(_declarations)


def _finish(backend: str, decl: OpDeclaration, fn: Callable) -> None:
    qualname = f"vqdna::{decl.name}_{backend}"
    torch.library.register_fake(qualname)(decl.fake)
    if decl.autograd is not None:
        backward, setup_context = decl.autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    _ops[(decl.name, backend)] = fn


def declarations() -> dict[str, OpDeclaration]:
    """Every declared op, by name (vqdna/kernels/ops/__init__.py)."""
    import vqdna.kernels.ops  # noqa: F401  (registers them)

    return dict(_declarations)


def declaration(op: str) -> OpDeclaration:
    decls = declarations()
    if op not in decls:
        raise KeyError(f"no op {op!r} is declared (vqdna/kernels/ops/__init__.py has {', '.join(decls)})")
    return decls[op]


def backend_op(op: str, backend: str) -> Callable:
    """The registered op `vqdna::<op>_<backend>`, with its fake and autograd formula. The caller has
    checked that `backend` can run `op` (dispatch.select_backend)."""
    key = (op, backend)
    if key not in _ops:
        decl = declaration(op)
        if backend in decl.compiled:  # a kernel this build lacks: torch names it in the error
            return getattr(torch.ops.vqdna, f"{op}_{backend}")
        if backend == "triton" and decl.triton:
            _finish("triton", decl, getattr(importlib.import_module(decl.triton), f"{op}_triton"))
        else:
            raise KeyError(f"vqdna.kernels.{op} has no {backend} backend")
    return _ops[key]
