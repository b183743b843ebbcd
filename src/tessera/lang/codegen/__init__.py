"""Code generators: one C-style printer, with a dialect per target."""
