"""The ``nonfinite=`` policy shared by every clipper: what to do with NaN/Inf gradients.

Policies:

* ``"propagate"`` (default): the gradient is passed through untouched, not scaled, so the
  NaN/Inf reaches whatever comes next (a loss scaler, :func:`optaxclip.skip_nonfinite`,
  ``optax.apply_if_finite``) where it can be detected and the step skipped, while the finite
  leaves keep their values. It never turns finite leaves into 0 or NaN, unlike
  ``optax.clip_by_global_norm`` (Inf zeroes the finite leaves, NaN spreads to all of them).
* ``"zero"``: the whole update becomes zeros (a silent skip for plain SGD; with stateful
  optimizers prefer :func:`optaxclip.skip_nonfinite`, which also freezes their state).
* ``"error"``: raises ``FloatingPointError`` naming the path of the first non-finite leaf.
  The check runs on the device and calls back to Python only when a non-finite value is
  present, so it costs nothing on healthy steps; under ``jit`` the error surfaces (wrapped in
  a ``JaxRuntimeError``) when the result is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optaxclip import _lowering as lowering
from optaxclip._numerics.arithmetic import multiply
from optaxclip._spec.validation import check_nonfinite, path_str


class NonfinitePolicy:
    """A validated ``nonfinite=`` argument and everything it decides on a non-finite step.

    Every clipper holds one and asks it, in one place each, what the update, the scale
    factors and the stats become when the gradient is not finite.
    """

    __slots__ = ("mode",)

    def __init__(self, mode: Any) -> None:
        self.mode = check_nonfinite(mode)

    @property
    def zeroes(self) -> bool:
        """Whether a non-finite step's update becomes zeros (``"zero"``)."""
        return self.mode == "zero"

    def raise_if_nonfinite(
        self, finite: jax.Array, paths: Sequence[Any], leaves: Sequence[jax.Array], clipper: str
    ) -> None:
        """Under ``"error"``, raises when ``finite`` is False, naming the first bad leaf.

        Eagerly the ``FloatingPointError`` is raised directly; under ``jit`` it is raised from
        a device callback and arrives wrapped in a ``JaxRuntimeError`` with the same message.
        """
        if self.mode != "error" or not leaves:
            return
        names = [path_str(p) for p in paths]

        def report(flags: Any) -> None:
            flags = np.asarray(flags).reshape(-1, len(names)).all(axis=0)
            if flags.all():
                return
            first = int(np.argmin(flags))
            raise FloatingPointError(
                f"{clipper}: the gradient leaf {names[first]} holds NaN or Inf "
                f"(nonfinite='error'). Use nonfinite='propagate' or wrap the optimizer in "
                f"optaxclip.skip_nonfinite to skip such steps instead."
            )

        def flags() -> jax.Array:
            return lowering.stack_against_chain_rewrite([jnp.all(jnp.isfinite(x)) for x in leaves])

        if not isinstance(finite, jax.core.Tracer):
            # Outside jit the check runs here, so the FloatingPointError reaches the caller as
            # itself rather than wrapped in a runtime error from the callback machinery.
            if not bool(finite):
                report(flags())
            return

        lax.cond(finite, lambda: None, lambda: jax.debug.callback(report, flags()))

    def factors(self, finite: jax.Array, factors: Any) -> Any:
        """Scale factors (a pytree of arrays) as the leaves should read them.

        Except under ``"zero"``, a non-finite step leaves the gradient unscaled: the factors
        become 1 here, once per vector, rather than a select per leaf in ``scale``. Under
        ``"zero"`` they are kept and ``scale`` zeroes the leaves.
        """
        if self.zeroes:
            return factors
        return jax.tree.map(lambda f: jnp.where(finite, f, 1), factors)

    def scale(
        self,
        leaves: Sequence[jax.Array],
        scales: Sequence[jax.Array],
        finite: jax.Array,
        coarse: Sequence[jax.Array] | None = None,
    ) -> list[jax.Array]:
        """Multiplies each leaf by its factors from ``factors``, applying the policy.

        Each output keeps its input dtype. With ``coarse`` (see ``shrink_factors``), leaf i is
        multiplied by ``coarse[i]`` first, then by ``scales[i]``.
        """
        firsts = list(coarse) if coarse is not None else [None] * len(leaves)
        if self.zeroes:
            return [
                jnp.where(finite, multiply(leaf, scale, first), jnp.zeros_like(leaf))
                for leaf, scale, first in zip(leaves, scales, firsts, strict=True)
            ]
        # Otherwise the factors already read 1 on a non-finite step (see ``factors``).
        return [
            multiply(leaf, scale, first)
            for leaf, scale, first in zip(leaves, scales, firsts, strict=True)
        ]

    def select(
        self, leaves: Sequence[jax.Array], transformed: Sequence[jax.Array], finite: jax.Array
    ) -> list[jax.Array]:
        """Keeps ``transformed`` when finite; otherwise the input (propagate) or zeros (zero)."""
        if self.zeroes:
            return [jnp.where(finite, t, jnp.zeros_like(t)) for t in transformed]
        return [jnp.where(finite, t, x) for x, t in zip(leaves, transformed, strict=True)]

    def report(self, finite: jax.Array, value: Any, *, if_zeroed: Any, if_passed: Any) -> jax.Array:
        """A stat: ``value`` on a finite step, else what it is when zeroed or passed through."""
        return jnp.where(finite, value, if_zeroed if self.zeroes else if_passed)
