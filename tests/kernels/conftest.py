"""Kernel tests run the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1, set before `kernels`
is imported; tests/conftest.py sets it too). GPU tests (marked `gpu`) need TRITON_INTERPRET=0."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections import defaultdict  # noqa: E402

import pytest  # noqa: E402

# (op, dtype) -> [max kernel error, max torch error] over the run, printed at the end.
_ERRORS: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])


@pytest.fixture
def triton_interpreter():
    """For tests of the Triton kernels themselves: they must run in the interpreter, not the torch reference."""
    import torch

    from kernels._utils import INTERPRET_AT_IMPORT, use_triton

    assert INTERPRET_AT_IMPORT, "kernel tests need TRITON_INTERPRET=1 before `kernels` is imported"
    assert use_triton(torch.zeros(1)), "the public ops must dispatch to Triton in these tests"


@pytest.fixture
def record():
    """Record a kernels.testing.Comparison for the end-of-run error summary."""

    def _record(op: str, dtype, comparison) -> None:
        e = _ERRORS[(op, str(dtype).replace("torch.", ""))]
        e[0] = max(e[0], comparison.kernel_err)
        e[1] = max(e[1], comparison.torch_err)

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _ERRORS:
        return
    terminalreporter.section("kernel max abs errors vs fp64 reference")
    for (op, dtype), (k, t) in sorted(_ERRORS.items()):
        terminalreporter.write_line(f"{op:16s} {dtype:9s} kernel {k:.3e}   torch same dtype {t:.3e}")
