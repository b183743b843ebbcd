"""The runtime layer: devices, memory, tensors, streams, the C toolchain and module cache."""
