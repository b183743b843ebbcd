"""Code generators: one C-style printer, with a dialect per target, and the math library
(`tessera_math.h`) that generated C and the C templates share."""

from pathlib import Path

MATH_HEADER = Path(__file__).with_name("tessera_math.h")

__all__ = ["MATH_HEADER"]
