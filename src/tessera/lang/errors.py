"""Kernel-language errors: each names the user's file:line and quotes the expression."""

from __future__ import annotations

from tessera.errors import TesseraError

__all__ = ["KernelError", "KernelSyntaxError", "KernelTypeError", "LaunchError"]


class KernelError(TesseraError):
    """Something in a kernel's source that Tessera cannot compile."""


class KernelSyntaxError(KernelError):
    """A Python construct the kernel language does not have."""


class KernelTypeError(KernelError, TypeError):
    """Types, dtypes or shapes that do not fit (broadcasting, casts, reductions, ...)."""


class LaunchError(TesseraError, TypeError):
    """A launch whose arguments or grid do not fit the kernel."""
