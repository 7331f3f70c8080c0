"""Layer 1, Python-side specifications: input checks, thresholds, device layouts, stats.

Nothing here builds array programs beyond the small constants a spec turns into; every
other layer may import it, and it imports no other layer.
"""
