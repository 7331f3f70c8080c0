"""layout_from_shardings: the ``layout=`` of a pytree, read from its arrays' shardings."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from optaxclip._spec.validation import path_str


def _spec_of(path: Any, x: Any) -> PartitionSpec:
    if isinstance(x, PartitionSpec):
        return x
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"layout_from_shardings: leaf {path_str(path)} is a traced value; call it on the "
            f"concrete (device_put / initialised) parameters, outside jit."
        )
    sharding = x if isinstance(x, jax.sharding.Sharding) else getattr(x, "sharding", None)
    if sharding is None:
        if isinstance(x, (np.ndarray, np.generic, int, float, complex)):
            return PartitionSpec()
        raise TypeError(
            f"layout_from_shardings: leaf {path_str(path)} has no sharding: got "
            f"{type(x).__name__}. Give jax.Arrays, ShapeDtypeStructs with a sharding, "
            f"NamedShardings or PartitionSpecs."
        )
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    if sharding.is_fully_replicated:
        return PartitionSpec()
    raise TypeError(
        f"layout_from_shardings: leaf {path_str(path)} has a {type(sharding).__name__}, which "
        f"names no mesh axes; shard it with a NamedSharding."
    )


def layout_from_shardings(tree: Any) -> Any:
    """The ``layout=`` of a parameter (or gradient) pytree: the PartitionSpec of every leaf.

    Pass the result as ``layout=`` to a clipper used inside ``jax.shard_map`` or ``jax.pmap``,
    together with ``axis_name``, when the layout cannot be read from JAX's types (``pmap``,
    ``shard_map(check_vma=False)``) or to have it checked against them. The gradients have the
    layout of their parameters, so the tree of parameters is the usual argument.

    Args:
      tree: a pytree whose leaves are ``jax.Array`` s (their ``.sharding``),
        ``jax.ShapeDtypeStruct`` s with a sharding, ``NamedSharding`` s or ``PartitionSpec`` s.
        Arrays on one device and fully replicated ones give ``PartitionSpec()``. Works on
        ``flax.nnx.State`` and other registered pytrees (``flax.nnx.get_partition_spec`` gives
        the same tree for NNX parameters).

    Returns:
      A pytree with the structure of ``tree`` whose leaves are ``PartitionSpec`` s.

    Raises:
      TypeError: a traced leaf, or a leaf without a usable sharding (names its path).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import optaxclip
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("model",))
      >>> params = {"w": jax.device_put(jnp.ones((2, 4)), NamedSharding(mesh, P(None, "model"))),
      ...           "b": jnp.zeros(4)}
      >>> optaxclip.layout_from_shardings(params)
      {'b': P(), 'w': P(None, 'model')}

    References:
      JAX, "Manual parallelism with shard_map"
      (https://docs.jax.dev/en/latest/notebooks/shard_map.html); ``docs/distributed.md``.
    """
    return jax.tree_util.tree_map_with_path(
        _spec_of, tree, is_leaf=lambda x: isinstance(x, (PartitionSpec, jax.sharding.Sharding))
    )
