"""GEMM templates (BLIS-structured, CUTLASS-layered; see sgemm.c): dense float32/16,
weight-only int8/int4, batched, grouped (MoE), prepacked, with fused epilogues."""

from tessera.templates.gemm.quant import GROUP_SIZES, QuantizedMatrix, quantize
from tessera.templates.gemm.sgemm import (
    ACTIVATIONS,
    Blocking,
    MoeDecode,
    PackedMatrix,
    batched_gemm,
    blocking,
    gemm,
    grouped_gemm,
    moe_decode,
    moe_decode_fits,
    pack,
)

__all__ = ["ACTIVATIONS", "GROUP_SIZES", "Blocking", "MoeDecode", "PackedMatrix",
           "QuantizedMatrix", "batched_gemm", "blocking", "gemm", "grouped_gemm", "moe_decode",
           "moe_decode_fits", "pack", "quantize"]
