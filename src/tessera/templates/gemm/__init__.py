"""GEMM templates (BLIS-structured, CUTLASS-layered; see sgemm.c)."""

from tessera.templates.gemm.sgemm import (
    ACTIVATIONS,
    Blocking,
    batched_sgemm,
    blocking,
    grouped_sgemm,
    sgemm,
)

__all__ = ["ACTIVATIONS", "Blocking", "batched_sgemm", "blocking", "grouped_sgemm", "sgemm"]
