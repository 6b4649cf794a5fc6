"""What a GPU can raise while building or launching a Triton kernel it cannot run (out of shared memory or registers,
a ptxas or compiler error, an autotuner with no config that fits). The driver (``autograd/driver.py``) catches these
around a path's passes: the call runs the next path, the key moves on for good, and the path table records the failure
(``backends/path_state.py``). Not the interpreter's errors: under ``TRITON_INTERPRET=1`` a kernel bug must fail the
tests, not be hidden by a fallback."""

from __future__ import annotations

from triton.compiler.errors import CompilationError
from triton.runtime.errors import AutotunerError, OutOfResources, PTXASError

KERNEL_FAILURES: tuple[type[BaseException], ...] = (OutOfResources, PTXASError, CompilationError, AutotunerError)


def first_line(err: BaseException) -> str:
    """The error's type and the first line of its message, for a warning or a report (compiler errors are long)."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:160]}"
