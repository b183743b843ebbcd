"""The GEMM template's side of autotuning: which blockings can run on this CPU, and the
blocking `tessera tune gemm` recorded for this machine in the knowledge base. It lives
here, below `tessera.tune`, so the template reads tuned results without importing the
tuner."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from tessera.runtime import knowledge
from tessera.runtime.cpu.device import cpu_features

__all__ = ["FIELDS", "KEY", "KIND", "invalid", "tuned_record", "vector_lanes",
           "vector_registers"]

KIND, KEY = "gemm.blocking", "float32"  # the record: tuned on float32, used by every GEMM
FIELDS = ("mr", "nr", "vl", "mc", "kc", "nc")
_MAX_PACK_BYTES = 64 << 20  # packed A and B blocks: far above any sane blocking


def vector_lanes() -> int:
    """Floats per vector register the template is built for: 16 with AVX-512, else 8."""
    return 16 if "avx512f" in cpu_features() else 8


def vector_registers() -> int:
    """Vector registers the micro-kernel may fill: 32 with AVX-512, else 16."""
    return 32 if "avx512f" in cpu_features() else 16


def invalid(params: Mapping[str, Any]) -> str | None:
    """Why blocking parameters cannot run on this CPU, or None if they can: the template
    relies on each rule (a wrong one would spill registers or overrun packing buffers)."""
    if set(params) != set(FIELDS) or not all(
            type(params[f]) is int and params[f] > 0 for f in FIELDS):
        return f"it needs positive integers {', '.join(FIELDS)}, got {dict(params)}"
    mr, nr, vl, mc, kc, nc = (params[f] for f in FIELDS)
    if vl != vector_lanes():
        return f"VL = {vl}, but this CPU's vectors hold {vector_lanes()} floats"
    if nr % vl:
        return f"NR = {nr} is not a multiple of VL = {vl}"
    if mr * (nr // vl) + nr // vl + 1 > vector_registers():
        return (f"a {mr}x{nr} micro-tile needs {mr * (nr // vl) + nr // vl + 1} vector "
                f"registers, this CPU has {vector_registers()}")
    if mc % mr or nc % nr:
        return f"MC = {mc} and NC = {nc} must be multiples of MR = {mr} and NR = {nr}"
    if 4 * kc * (mc + nc) > _MAX_PACK_BYTES:
        return f"its packing buffers (KC = {kc}, MC = {mc}, NC = {nc}) exceed 64 MiB"
    return None


def tuned_record() -> dict[str, Any] | None:
    """The tuner's record for this machine (its "blocking" can run here), or None: none
    was recorded, or the record is untrustworthy or unusable (then with a warning)."""
    record = knowledge.load(KIND, KEY)
    if record is None:
        return None
    params = record.get("blocking")
    why = invalid(params) if isinstance(params, dict) else "it has no blocking"
    if why:
        warnings.warn(f"ignoring the tuned GEMM blocking of this machine: {why}; the default "
                      "is used (re-tune with `tessera tune gemm`)", RuntimeWarning, stacklevel=2)
        return None
    return record
