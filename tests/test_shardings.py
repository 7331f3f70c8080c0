"""layout_from_shardings: the ``layout=`` of a pytree, read from its arrays' shardings.

Runs in this process on a one-device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.runs import one_device_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip


def test_layout_from_shardings_reads_named_shardings_and_treats_unsharded_as_replicated() -> None:
    mesh = one_device_mesh("data", "model")
    tree = {
        "array": jax.device_put(jnp.ones((2, 4)), NamedSharding(mesh, P(None, "model"))),
        "plain": jnp.ones(3),
        "numpy": np.ones(3),
        "sharding": NamedSharding(mesh, P("data")),
        "spec": P(("data", "model")),
        "struct": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P("model"))),
    }
    assert optaxclip.layout_from_shardings(tree) == {
        "array": P(None, "model"),
        "plain": P(),
        "numpy": P(),
        "sharding": P("data"),
        "spec": P(("data", "model")),
        "struct": P("model"),
    }


def test_layout_from_shardings_rejects_traced_and_unshardable_leaves() -> None:
    with pytest.raises(TypeError, match=r"\['x'\].*traced"):
        jax.jit(lambda t: optaxclip.layout_from_shardings(t) and 0)({"x": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"\['y'\].*no sharding"):
        optaxclip.layout_from_shardings({"y": "text"})
