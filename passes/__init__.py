"""Compiler passes of surgeon-fx; each module does one job and takes and returns plain data."""
