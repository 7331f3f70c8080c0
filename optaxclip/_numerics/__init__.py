"""Layer 2, numerics: pure array math and the one reduction engine over pytree leaves.

Accumulation dtypes, safe roots and divisions, scale factors, and global, per-leaf and
per-unit norms and sums. Backend-specific program shapes come from ``optaxclip._lowering``.
"""
