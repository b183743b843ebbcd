"""Kernels written in Tessera's kernel language (tessera.lang), each with a function that
takes torch tensors and returns a new one. They are the language's worked examples and
the kernels that tessera.ops builds on; each is tested against torch."""

from tessera.kernels.attention import flash_attention
from tessera.kernels.elementwise import add, bias_gelu
from tessera.kernels.gemm import matmul
from tessera.kernels.rows import layer_norm, rms_norm, softmax

__all__ = ["add", "bias_gelu", "flash_attention", "layer_norm", "matmul", "rms_norm",
           "softmax"]
