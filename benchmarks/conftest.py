"""Benchmark session setup; the shared helpers live in harness.py (see it for the size switch)."""

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated: set it before ddpm_fast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
