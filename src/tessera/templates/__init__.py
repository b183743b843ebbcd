"""Templates: parameterized C kernels (GEMM first) with Python builders that choose their
blocking for the machine, compile them through the runtime toolchain and launch them."""
