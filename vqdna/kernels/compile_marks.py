"""torch.compile markers that cost nothing at import.

`torch.compiler.assume_constant_result` imports torch._dynamo (about a second) only to set one
attribute on the function; the kernels apply it at import, so they set that attribute themselves.
tests/kernels/test_compile_marks.py checks it still matches what torch's decorator sets.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def assume_constant_result(fn: F) -> F:
    """Mark `fn` as torch.compiler.assume_constant_result does (torch.compile evaluates it once while
    tracing and bakes the result into the graph), without importing torch._dynamo."""
    fn._dynamo_marked_constant = True  # what torch._dynamo.decorators.assume_constant_result sets
    return fn
