"""Pure array math: accumulation dtypes, safe roots and divisions, scale factors, partial sums.

Accuracy contract:

* Every leaf is reduced in float32 (float64 for float64/complex128 leaves), whatever its own
  dtype, so fp16/bf16 gradients never overflow or underflow in the reduction.
* A direct power sum that overflows, or (for p = 2) falls where squares lose bits to the
  subnormal range, is recomputed on leaves divided by their largest magnitude
  (``needs_rescue``, ``rescale_divisor``).
* Derivatives are finite everywhere, the all-zero input included: roots and divisions use the
  "double where" form.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Below this sum of squares, float32 squares have lost bits to the subnormal range.
TINY_SUM_OF_SQUARES = 2.0**-96

# Below this, a clip ratio is carried as two factors (see shrink_factors).
_SPLIT_RATIO = 2.0**-100


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a reduction over leaves of ``dtype`` accumulates in (float32 or float64)."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def result_dtype(leaves: Any) -> jnp.dtype:
    """float64 if any leaf accumulates in float64, float32 otherwise (also when empty)."""
    dtypes = {accumulation_dtype(x.dtype) for x in leaves}
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` with 0 where the denominator is 0; finite derivatives."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def safe_root(total: jax.Array, p: float) -> jax.Array:
    """``total ** (1/p)`` for total >= 0, with a finite derivative at 0 (which is 0).

    A NaN total stays NaN: a NaN gradient must not get the norm 0, which would hide it from
    the non-finite policies.
    """
    positive = total > 0
    safe = jnp.where(positive, total, 1)
    root = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
    return jnp.where(positive, root, jnp.where(jnp.isnan(total), total, 0))


def rescale_divisor(largest: jax.Array) -> jax.Array:
    """What a rescaled sum divides by: ``largest``, at most 2^126 (1 for 0, subnormal, inf or NaN).

    Dividing by an entry above 2^126 may be computed as a multiplication by its reciprocal,
    which is subnormal and flushed to 0 on CPUs. Capped there, the quotients stay at most 4
    and their squares cannot overflow.
    """
    cap = 2.0 ** (jnp.finfo(largest.dtype).maxexp - 2)
    # A subnormal largest entry is read as 0 by CPUs that flush subnormal operands, so
    # dividing by it would give 0/0: such entries are left to the direct sum.
    usable = (largest >= jnp.finfo(largest.dtype).tiny) & jnp.isfinite(largest)
    return jnp.where(usable, jnp.minimum(largest, cap), 1)


def power_of_two_divisor(largest: jax.Array) -> jax.Array:
    """A power of two in ``(largest, 2 * largest]``, bounded to ``[2^-126, 2^126]``.

    Dividing by a power of two only shifts exponents, so a mean or a sum of squares of the
    quotients rounds exactly as that of the values would, and the whole statistic is that
    result times the divisor; but the quotients are below 4, so their squares and sums
    cannot overflow. Within the bounds the divisor and its reciprocal are normal floats, so
    a division carried out as a multiplication by the reciprocal stays exact on CPUs that
    flush subnormals. 0 gives 1.
    """
    _, exponent = jnp.frexp(lax.stop_gradient(largest))
    return jnp.ldexp(jnp.ones_like(largest), jnp.clip(exponent, -126, 126))


def window_mean_std(
    values: jax.Array, filled: jax.Array, *, ddof: int
) -> tuple[jax.Array, jax.Array]:
    """Mean and standard deviation along axis 0 of the first ``filled`` entries of a buffer.

    The statistics of a ring buffer of past values, such as the norms of the last steps: the
    entries past ``filled`` are unused and masked out. ``ddof`` is subtracted from the count
    in the variance's divisor (0 for the population statistic, 1 for Bessel's correction),
    which never goes below 1. The sums run over the values divided by a power of two near the
    largest magnitude: sums of values or squares of deviations beyond the square root of the
    largest float would overflow, and an infinite statistic would switch off any threshold
    built on it. With ``filled`` 0 both are 0.
    """
    size = values.shape[0]
    mask = (jnp.arange(size) < filled).reshape((size,) + (1,) * (values.ndim - 1))
    n = jnp.maximum(filled, 1).astype(jnp.float32)
    scale = power_of_two_divisor(jnp.max(jnp.where(mask, jnp.abs(values), 0), axis=0))
    scaled = jnp.where(mask, values / scale, 0)
    scaled_mean = jnp.sum(scaled, axis=0) / n
    squares = jnp.where(mask, jnp.square(scaled - scaled_mean), 0)
    scaled_var = jnp.sum(squares, axis=0) / jnp.maximum(n - ddof, 1)
    return scale * scaled_mean, scale * safe_root(scaled_var, 2.0)


class ScaledNorm(NamedTuple):
    """A norm (or a vector of norms) held as ``divisor * root``.

    A rescaled reduction divides the entries by their largest magnitude before summing, so
    ``root`` stays in range even where the norm itself passes float32's largest number: a
    finite gradient whose norm reads inf as one number is still clipped exactly from these
    two. ``divisor`` is 1 where no rescaling was needed.
    """

    divisor: jax.Array
    root: jax.Array

    @property
    def value(self) -> jax.Array:
        """The norm as one number: inf where it passes the dtype's range."""
        return self.divisor * self.root

    @property
    def finite(self) -> jax.Array:
        """Whether every entry reduced was finite (NaN or Inf make ``root`` non-finite)."""
        return jnp.isfinite(self.root)

    @property
    def saturated(self) -> jax.Array:
        """``value``, with a finite norm past the dtype's range read as its largest number.

        What a threshold rule sees: larger than any threshold, yet finite in a statistic.
        """
        value = self.value
        largest = jnp.finfo(value.dtype).max
        return jnp.where(self.finite & jnp.isinf(value), largest, value)


def plain_norm(norm: jax.Array) -> ScaledNorm:
    """A norm computed as one number, in the scaled form (divisor 1)."""
    return ScaledNorm(jnp.ones_like(norm), norm)


def shrink_factors(
    limit: jax.Array, norm: jax.Array | ScaledNorm, over: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``limit / norm`` where ``over`` (else 1), as factors ``(coarse, fine)`` of that ratio.

    CPUs flush subnormal results to zero, so a ratio below 2^-126 (a norm more than 2^126
    times its limit) would come out as 0 and zero the gradient, whose clipped entries are in
    fact as large as the limit. Ratios below 2^-100 are therefore returned as ``2^-100`` times
    a normal number; otherwise ``coarse`` is 1 and ``fine`` is the ratio itself, so that
    ``(x * coarse) * fine`` is bit for bit ``x * ratio``. A :class:`ScaledNorm` past the
    dtype's range (its value reads inf, its entries are finite) gives ``coarse``, the power of
    two that brings its divisor into [1, 2), and ``fine``, the limit over the rest. Works
    elementwise on vectors of norms. Double-where form: the derivative is finite everywhere.
    """
    if not isinstance(norm, ScaledNorm):
        return _shrink_factors(limit, norm, over)
    value = norm.value
    coarse, fine = _shrink_factors(limit, value, over)
    past = over & jnp.isinf(value) & norm.finite
    limit = jnp.asarray(limit).astype(value.dtype)
    divisor = jnp.where(past, norm.divisor, 1)
    root = jnp.where(past, norm.root, 1)
    # coarse = 2^k with k as large as keeps both the divided norm (below 2^124) and
    # limit / (norm * coarse) (above 2^-126) in range: every entry whose clipped value is a
    # normal number stays normal after the first multiplication.
    _, e_divisor = jnp.frexp(divisor)
    _, e_root = jnp.frexp(root)
    _, e_limit = jnp.frexp(jnp.where(past & (limit > 0), limit, 1))
    top = jnp.finfo(value.dtype).maxexp - 4
    k = jnp.clip(
        jnp.minimum(e_limit + top, top) - e_divisor - e_root, jnp.finfo(value.dtype).minexp, 0
    )
    down = jnp.ldexp(jnp.ones_like(divisor), k)
    beyond = limit / ((divisor * down) * root)
    return jnp.where(past, down, coarse), jnp.where(past, beyond, fine)


def _shrink_factors(
    limit: jax.Array, norm: jax.Array, over: jax.Array
) -> tuple[jax.Array, jax.Array]:
    limit = jnp.asarray(limit).astype(norm.dtype)
    safe_norm = jnp.where(over, norm, 1)
    direct = jnp.where(over, limit / safe_norm, 1)
    tiny = over & (direct < _SPLIT_RATIO)
    lifted = jnp.where(tiny, limit, 0) * (1 / _SPLIT_RATIO) / safe_norm
    fine = jnp.where(tiny, lifted, direct)
    coarse = jnp.where(tiny, jnp.asarray(_SPLIT_RATIO, norm.dtype), jnp.asarray(1, norm.dtype))
    return coarse, fine


def scaled_post_norm(norm: jax.Array | ScaledNorm, coarse: jax.Array, fine: jax.Array) -> jax.Array:
    """The norm after multiplying by ``coarse`` then ``fine`` (``shrink_factors``' pair)."""
    if not isinstance(norm, ScaledNorm):
        return (norm * coarse) * fine
    value = norm.value
    past = jnp.isinf(value) & norm.finite
    beyond = ((jnp.where(past, norm.divisor, 1) * coarse) * norm.root) * fine
    return jnp.where(past, beyond, (value * coarse) * fine)


def multiply(leaf: jax.Array, scale: jax.Array, coarse: jax.Array | None = None) -> jax.Array:
    """``leaf * scale`` (``(leaf * coarse) * scale`` with ``coarse``) in the leaf's dtype.

    fp16/bf16 leaves are multiplied in float32 and rounded once. A scale of exactly 1 returns
    the leaf bit for bit, except for subnormal entries on backends that flush them to 0 in
    every multiplication (XLA:CPU does).
    """
    if leaf.dtype in (jnp.float16, jnp.bfloat16):
        wide = lax.convert_element_type(leaf, jnp.float32)
        if coarse is not None:
            wide = _times(wide, coarse)
        return lax.convert_element_type(_times(wide, scale), leaf.dtype)
    if coarse is not None:
        leaf = _times(leaf, coarse)
    return _times(leaf, scale)


def _times(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``x * factor`` for a scalar ``factor``, taken in the real dtype of ``x``.

    Bound as lax primitives for real leaves: the same program as ``jnp.multiply``, without its
    per-call dispatch, which a clip pays once or twice per leaf.
    """
    real = jnp.finfo(x.dtype).dtype
    if factor.dtype != real:
        factor = lax.convert_element_type(factor, real)
    if x.dtype != real:  # complex leaves: jnp's promotion
        return x * factor
    return lax.mul(x, factor)


def magnitude(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    """``|x|`` in ``acc`` (the modulus of complex entries)."""
    if jnp.iscomplexobj(x):
        return jnp.abs(x.astype(jnp.complex128 if acc == jnp.float64 else jnp.complex64))
    return jnp.abs(x.astype(acc))


def power_sum(
    x: jax.Array,
    p: float,
    acc: jnp.dtype,
    divisor: jax.Array | None = None,
    axis: int | tuple[int, ...] | None = None,
    *,
    keepdims: bool = False,
) -> jax.Array:
    """``sum(|x / divisor| ** p)`` accumulated in ``acc``, over all of x or along ``axis``.

    ``divisor`` must broadcast against ``x``.
    """
    if p == 2 and jnp.iscomplexobj(x):
        re = jnp.real(x).astype(acc)
        im = jnp.imag(x).astype(acc)
        if divisor is not None:
            re, im = re / divisor, im / divisor
        return jnp.sum(re * re + im * im, axis=axis, keepdims=keepdims)
    if jnp.iscomplexobj(x):
        mag = magnitude(x, acc)
    elif p == 2:
        mag = x.astype(acc)
    else:
        mag = jnp.abs(x.astype(acc))
    if divisor is not None:
        mag = mag / divisor
    if p == 2:
        return jnp.sum(mag * mag, axis=axis, keepdims=keepdims)
    if p == 1:
        return jnp.sum(mag, axis=axis, keepdims=keepdims)
    return jnp.sum(mag**p, axis=axis, keepdims=keepdims)


def abs_max(x: jax.Array, acc: jnp.dtype, axis: int | None = None) -> jax.Array:
    """max |x| (over all of x, or along ``axis``), NaN if any entry is NaN."""
    if x.size == 0:
        return jnp.zeros((), acc)
    # NaN is kept by a separate flag: on a sharded array the max becomes a cross-device max,
    # which XLA's CPU collectives compute without propagating NaN.
    mag = magnitude(x, acc)
    nan = jnp.isnan(mag)
    return jnp.where(
        jnp.any(nan, axis=axis), jnp.nan, jnp.max(jnp.where(nan, -jnp.inf, mag), axis=axis)
    )


def abs_max_for_scaling(
    x: jax.Array, acc: jnp.dtype, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """max |x| as one plain reduction, for a rescaled sum only.

    The divisor only sets the scale: a NaN in ``x`` makes the scaled sum NaN whatever the
    divisor, so the NaN bookkeeping of ``abs_max`` (which keeps a full-size temporary of
    ``|x|``) is not needed here.
    """
    if x.size == 0:
        return jnp.zeros((), acc)
    if jnp.iscomplexobj(x):
        # The larger of |re| and |im|, not the modulus, which passes the float range for
        # finite parts near its top: the divided parts still square to at most 16 each.
        mag = jnp.maximum(jnp.abs(jnp.real(x).astype(acc)), jnp.abs(jnp.imag(x).astype(acc)))
    else:
        mag = magnitude(x, acc)
    if axis is not None:
        return lax.reduce_max(mag, (axis,) if isinstance(axis, int) else axis)
    return lax.reduce_max(mag, tuple(range(mag.ndim))) if mag.ndim else mag


def psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.psum`` over ``axes``, or ``x`` itself when there are none."""
    return lax.psum(x, axes) if axes else x


def pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.pmax`` that keeps NaN (the cross-device max of XLA's CPU collectives drops it)."""
    if not axes:
        return x
    nan = lax.pmax(jnp.isnan(x).astype(jnp.int32), axes) > 0
    return jnp.where(nan, jnp.nan, lax.pmax(jnp.where(jnp.isnan(x), -jnp.inf, x), axes))


def needs_rescue(total: jax.Array, p: float, *, zero_is_suspect: bool) -> jax.Array:
    """Whether a direct power sum may be wrong: overflowed, or squares lost to underflow.

    CPUs flush subnormals to zero, so squares below ~1.2e-38 vanish and a sum of exactly 0
    may hide a nonzero norm. ``zero_is_suspect`` re-checks exact zeros; per-leaf and per-unit
    norms do not, so that an all-zero (frozen) leaf does not force the rescaled pass on every
    step: a leaf whose entries are all below ~1e-19 in magnitude then counts as 0.
    """
    overflow = jnp.isinf(total)
    if p == 2:
        low = total < TINY_SUM_OF_SQUARES
        if not zero_is_suspect:
            low = low & (total > 0)
        return overflow | low
    return overflow


def combine_norms(norms: jax.Array, p: float) -> jax.Array:
    """The p-norm of a vector of partial norms, without overflow (a cheap, small reduction)."""
    if norms.size == 0:
        return jnp.zeros((), norms.dtype)
    if p == math.inf:
        return jnp.max(norms)
    largest = lax.stop_gradient(jnp.max(norms))
    divisor = rescale_divisor(largest)
    return divisor * safe_root(jnp.sum((norms / divisor) ** p), p)


def combine_scaled_norms(norms: ScaledNorm, p: float) -> ScaledNorm:
    """``combine_norms`` of a vector of scaled norms, kept in the scaled form.

    Each part is brought to the largest divisor before the sum, so that parts whose values
    pass the dtype's range still combine into a finite ``root``.
    """
    if norms.root.size == 0:
        return plain_norm(jnp.zeros((), norms.root.dtype))
    if p == math.inf:  # max |x| needs no divisor: it is one of the entries
        return plain_norm(combine_norms(norms.value, p))
    divisor = lax.stop_gradient(jnp.max(norms.divisor))
    parts = (norms.divisor / divisor) * norms.root
    return ScaledNorm(divisor, combine_norms(parts, p))
