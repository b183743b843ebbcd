"""The autotuner: measure which template parameters are fastest on this machine and keep
them in the per-machine knowledge base (`tessera.runtime.knowledge`), which the templates
read without importing this layer."""

from tessera.tune.gemm import FULL_SIZES, MAX_NOISE, QUICK_SIZES, tune_gemm

__all__ = ["FULL_SIZES", "MAX_NOISE", "QUICK_SIZES", "tune_gemm"]
