"""Layer 3, the clip engine: scale leaves to a threshold under the non-finite policy.

Every clipper goes through it; it holds no method of its own.
"""
