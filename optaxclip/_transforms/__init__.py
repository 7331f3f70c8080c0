"""Layer 4, transforms: one module per family of clippers, each an optax transformation."""
