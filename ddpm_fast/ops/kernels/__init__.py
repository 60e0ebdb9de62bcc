"""Triton kernels, one module per op, imported by the ops' Triton launchers when first used."""
