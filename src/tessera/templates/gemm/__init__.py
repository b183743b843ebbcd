"""GEMM templates (BLIS-structured, CUTLASS-layered; see sgemm.c)."""

from tessera.templates.gemm.sgemm import ACTIVATIONS, Blocking, blocking, grouped_sgemm, sgemm

__all__ = ["ACTIVATIONS", "Blocking", "blocking", "grouped_sgemm", "sgemm"]
