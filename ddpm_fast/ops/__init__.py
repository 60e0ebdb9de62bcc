"""Fused ops: one file per op (kernel -> launcher -> registered torch op -> public function, with the
pure-torch ``<op>_ref`` beside them), and the registry (registry.py) that picks their implementations.
See registry.py for the backends and how the choice is made.
"""

from ddpm_fast.base import memory_format
from ddpm_fast.ops.conv3x3 import (
    conv3x3,
    conv3x3_ref,
    conv3x3_residual_add,
    transformed_weight,
    uses_winograd,
    winograd_weight,
)
from ddpm_fast.ops.group_norm_silu import (
    group_norm_scale_shift_silu,
    group_norm_scale_shift_silu_ref,
    group_norm_silu,
    group_norm_silu_cat,
    group_norm_silu_ref,
    joins_in_place,
)
from ddpm_fast.ops.packed_conv import packed_conv, packed_conv_ref, packed_weight, uses_packed_conv
from ddpm_fast.ops.q_sample import q_sample, q_sample_ref
from ddpm_fast.ops.registry import (
    ALIASES,
    BACKENDS,
    backend_for,
    backend_unavailable_reason,
    cpu_bf16_is_faster,
    cpu_half_dtype,
    cpu_has_native_bf16,
    environment_problem,
    extension,
    launch,
    needs_grad,
    requested_backend,
    set_backend,
    triton_available,
    triton_interpreting,
    use_backend,
)
from ddpm_fast.ops.residual_add import residual_add, residual_add_ref
from ddpm_fast.ops.reverse_step import COEF_COLUMNS, reverse_step, reverse_step_ref
from ddpm_fast.ops.vb_terms import VB_COLUMNS, vb_terms, vb_terms_ref

__all__ = [
    "ALIASES",
    "BACKENDS",
    "COEF_COLUMNS",
    "VB_COLUMNS",
    "backend_for",
    "backend_unavailable_reason",
    "conv3x3",
    "conv3x3_ref",
    "conv3x3_residual_add",
    "cpu_bf16_is_faster",
    "cpu_half_dtype",
    "cpu_has_native_bf16",
    "environment_problem",
    "extension",
    "group_norm_scale_shift_silu",
    "group_norm_scale_shift_silu_ref",
    "group_norm_silu",
    "group_norm_silu_cat",
    "group_norm_silu_ref",
    "joins_in_place",
    "launch",
    "memory_format",
    "needs_grad",
    "packed_conv",
    "packed_conv_ref",
    "packed_weight",
    "q_sample",
    "q_sample_ref",
    "requested_backend",
    "residual_add",
    "residual_add_ref",
    "reverse_step",
    "reverse_step_ref",
    "set_backend",
    "transformed_weight",
    "triton_available",
    "triton_interpreting",
    "use_backend",
    "uses_packed_conv",
    "uses_winograd",
    "vb_terms",
    "vb_terms_ref",
    "winograd_weight",
]
