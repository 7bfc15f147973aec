"""Which backend runs a kernel op: Triton for CUDA tensors, the plain-torch reference elsewhere.

Every op module (`fake_quant.py`, `prune.py`, `encode_moments.py`) asks `use_triton(...)` at its one
dispatch point. `QDM_DISABLE_TRITON=1` forces the references everywhere (to rule the kernels out when
a result looks wrong). `TRITON_INTERPRET=1` (set before triton is imported) runs the kernels on CPU
tensors through Triton's interpreter: that is how the tests exercise them without a GPU; launchers
then use one fixed small block configuration instead of autotuning.

Triton is optional: CPU-only torch wheels do not pull it in, so when it is missing the op modules
still import (against the stand-ins below) and only a direct launcher call fails.
"""

from __future__ import annotations

import os

import torch

DISABLE_ENV = "QDM_DISABLE_TRITON"

try:  # pragma: no branch
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _MissingTriton:
        """Enough of `triton` for kernel definitions to import; the kernels can never launch."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_args, **_kwargs):
            return lambda f: f

        @staticmethod
        def Config(*_args, **_kwargs):  # noqa: N802 - mirrors triton.Config
            return None

    class _MissingLanguage:
        constexpr = object

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingLanguage()  # type: ignore[assignment]


def triton_disabled() -> bool:
    """True when `QDM_DISABLE_TRITON` is set to anything but an empty/false value."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """The one "use the Triton kernel?" rule: triton present, not disabled, not interpreting, every
    tensor on CUDA. Under the interpreter the dispatch points keep to the references (interpreting
    full-size work would take hours); tests call the launchers directly."""
    if not HAS_TRITON or triton_disabled() or interpreting():
        return False
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present)


def require_triton(op: str) -> None:
    """Raise a clear error when a launcher is called where Triton cannot run."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed; use the reference (or the dispatch function)")


def check_launchable(op: str, *tensors: torch.Tensor | None) -> None:
    """Launchers run on CUDA tensors, or on CPU tensors under the interpreter; all on one device."""
    require_triton(op)
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        )
