"""The CPU backend: host device, host memory, ISA detection and measured peaks."""
