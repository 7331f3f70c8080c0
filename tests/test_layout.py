"""Layouts: which device axes each leaf is split along, read from a ``layout=`` pytree or from
the leaves' device-variance types inside ``shard_map``, and the errors of a bad layout.

Everything runs in this process on a one-device mesh: layouts are resolved and checked when
the step is traced, so nothing is compiled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import pytest
from helpers.runs import one_device_mesh, trace_in_shard_map
from jax.sharding import PartitionSpec as P

import optaxclip
from optaxclip._spec.layout import leaf_dim_axes, leaf_reduction_axes, normalize_axis_names

GRADS = {"w": jnp.ones((2, 4)), "b": jnp.ones(4), "s": jnp.ones(())}


def test_layout_prefix_by_key_path_covers_nested_leaves_and_ignores_extra_entries() -> None:
    mesh = one_device_mesh("model")
    grads = {"enc": {"w": jnp.ones((2, 4)), "b": jnp.ones(4)}, "head": jnp.ones((4, 2))}
    specs = {"enc": {"w": P(None, "model"), "b": P("model")}, "head": P()}
    layout = {"enc": P("model"), "head": P(), "frozen": P("model")}
    axes = trace_in_shard_map(
        lambda t: leaf_reduction_axes(t, "model", layout), grads, specs, mesh, check_vma=False
    )
    assert axes == [("model",), ("model",), ()]


def test_layout_from_vma_types_skips_replicated_leaves_without_a_layout() -> None:
    mesh = one_device_mesh("data", "model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    axes = trace_in_shard_map(
        lambda t: leaf_reduction_axes(t, ("data", "model"), None), GRADS, specs, mesh
    )
    # tree_leaves order: b, s, w
    assert axes == [(), (), ("model",)]
    dims = trace_in_shard_map(
        lambda t: leaf_dim_axes(t, ("data", "model"), None), GRADS, specs, mesh
    )
    assert dims == [((),), (), None]


def test_without_vma_types_every_leaf_is_taken_as_split_along_all_axes() -> None:
    mesh = one_device_mesh("data", "model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    axes = trace_in_shard_map(
        lambda t: leaf_reduction_axes(t, ("data", "model"), None),
        GRADS,
        specs,
        mesh,
        check_vma=False,
    )
    assert axes == [("data", "model")] * 3


def test_leaf_dim_axes_gives_each_dimensions_axes_from_partition_specs() -> None:
    mesh = one_device_mesh("data", "model")
    specs = {"w": P(("data", "model"), None), "b": P("model"), "s": P()}
    dims = trace_in_shard_map(
        lambda t: leaf_dim_axes(t, ("model", "data"), specs), GRADS, specs, mesh
    )
    assert dims == [(("model",),), (), (("data", "model"), ())]
    axes = trace_in_shard_map(
        lambda t: leaf_reduction_axes(t, ("model", "data"), specs), GRADS, specs, mesh
    )
    assert axes == [("model",), (), ("model", "data")]


def test_layout_claiming_a_replicated_leaf_is_split_raises() -> None:
    mesh = one_device_mesh("model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    bad = {"w": P(None, "model"), "b": P("model"), "s": P()}
    with pytest.raises(ValueError, match=r"\['b'\].*split along \['model'\].*replicated"):
        trace_in_shard_map(
            lambda t: optaxclip.global_norm(t, axis_name="model", layout=bad), GRADS, specs, mesh
        )


def test_layout_naming_a_mapped_axis_missing_from_axis_name_raises() -> None:
    mesh = one_device_mesh("data", "model")
    specs = {"w": P("data", "model"), "b": P(), "s": P()}
    with pytest.raises(ValueError, match=r"\['w'\].*'data'.*not in axis_name"):
        trace_in_shard_map(
            lambda t: optaxclip.global_norm(t, axis_name="model", layout=specs),
            GRADS,
            specs,
            mesh,
        )


def test_layout_missing_a_leaf_names_that_leaf() -> None:
    mesh = one_device_mesh("model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    with pytest.raises(ValueError, match=r"no entry for gradient leaf \['s'\]"):
        trace_in_shard_map(
            lambda t: optaxclip.global_norm(
                t, axis_name="model", layout={"w": P(None, "model"), "b": P()}
            ),
            GRADS,
            specs,
            mesh,
        )


def test_layout_with_more_entries_than_dimensions_raises() -> None:
    mesh = one_device_mesh("model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    layout = {"w": P(None, "model"), "b": P(None, None), "s": P()}
    with pytest.raises(ValueError, match=r"\['b'\].*2 entries.*1 dimensions"):
        trace_in_shard_map(
            lambda t: leaf_reduction_axes(t, "model", layout), GRADS, specs, mesh, False
        )


def test_unreduced_partition_spec_is_rejected() -> None:
    mesh = one_device_mesh("model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    layout = {"w": P(None, "model"), "b": P(unreduced={"model"}), "s": P()}
    with pytest.raises(ValueError, match=r"\['b'\].*unreduced"):
        trace_in_shard_map(
            lambda t: leaf_reduction_axes(t, "model", layout), GRADS, specs, mesh, False
        )


def test_axis_name_outside_shard_map_raises_with_advice() -> None:
    clipper = optaxclip.clip_by_global_norm(1.0, axis_name="model")
    with pytest.raises(ValueError, match=r"'model' is not a mapped axis.*leave it None"):
        jax.jit(clipper.update)(GRADS, clipper.init(GRADS))


def test_layout_without_axis_name_raises() -> None:
    with pytest.raises(ValueError, match="layout was given without axis_name"):
        optaxclip.global_norm(GRADS, layout=P())


@pytest.mark.parametrize(
    ("axis_name", "error"),
    [(3, TypeError), (("a", 1), TypeError), (("a", "a"), ValueError), ("", ValueError)],
)
def test_normalize_axis_names_rejects_bad_names(axis_name: Any, error: type) -> None:
    with pytest.raises(error, match="axis_name"):
        normalize_axis_names(axis_name)


def test_layout_entry_of_wrong_type_names_the_leaf() -> None:
    mesh = one_device_mesh("model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    with pytest.raises(TypeError, match=r"\['b'\]"):
        trace_in_shard_map(
            lambda t: leaf_reduction_axes(t, "model", lambda path, leaf: 3),
            {"b": GRADS["b"]},
            {"b": specs["b"]},
            mesh,
            False,
        )
