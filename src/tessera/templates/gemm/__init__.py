"""GEMM templates (BLIS-structured, CUTLASS-layered; see sgemm.c)."""

from tessera.templates.gemm.sgemm import Blocking, blocking, sgemm

__all__ = ["Blocking", "blocking", "sgemm"]
