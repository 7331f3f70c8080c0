"""Layer 5, guards: wrappers that skip a whole optimizer step."""
