"""Runs the transforms of ``dist_cases`` on 8 host devices in five ways and pickles the results.

Usage (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before start):

    python dist_sharded_checks.py OUT.pkl [CASE ...]

Every way runs all the cases together for ``dist_cases.STEPS`` steps inside one compiled
program (a ``lax.scan`` over the steps), so each way compiles once:

* ``reference``: one device, no sharding;
* ``gspmd``: ``jax.jit`` on arrays with a ``NamedSharding`` on the (data, model) mesh with
  Explicit axes and no ``axis_name``; the compiled HLO text is kept for the collective check;
* ``gspmd_auto``: the same on a ``jax.sharding.Mesh`` (Auto axes), whose shardings the traced
  types do not carry;
* ``shard_map_types``: ``jax.shard_map`` (check_vma=True) with ``axis_name=("data", "model")``
  and no layout, so replicated leaves are recognised from JAX's types; the state is replicated
  and typed invariant (shard_map rejects a state that could differ between devices);
* ``shard_map_layout``: ``jax.shard_map`` (check_vma=False) with ``layout=`` the PartitionSpecs;
  every device returns its own copy of the state;
* ``pmap``: ``jax.pmap`` over 8 devices with the same layout on its one axis.

When a way fails for the cases together, each case is run alone in it, so that an error is
recorded against the case that raised it. The test (``tests/test_distributed.py``) does the
comparing; this script only records.
"""

from __future__ import annotations

import pickle
import sys
import time
import traceback
from typing import Any

import dist_cases as dc
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
ALL = P(AXES)  # one block per device: how per-device copies of the state are laid out
STACKED_SPECS = jax.tree.map(lambda s: P(None, *s), dc.SPECS)  # a leading step axis


def _stacked_grads() -> Any:
    per_step = [dc.grads(t) for t in range(dc.STEPS)]
    return jax.tree.map(lambda *xs: np.stack(xs), *per_step)


def _losses() -> np.ndarray:
    return np.asarray([dc.loss(t) for t in range(dc.STEPS)], np.float32)


def _program(
    names: list[str], axis_name: Any, layout: Any, *, local_state: bool, by_types: bool = False
) -> Any:
    """``run(grads, states, params, losses) -> (updates, states)`` over all steps and cases.

    With ``local_state`` the states come in and go out with a leading per-device axis of 1.
    With ``by_types`` only the cases that need a per-dimension layout get ``layout``.
    """
    txs = {
        name: dc.CASES[name].make(
            axis_name, layout if not by_types or dc.CASES[name].needs_layout else None
        )
        for name in names
    }

    def run(grads: Any, states: Any, params: Any, losses: Any) -> Any:
        if local_state:
            states = jax.tree.map(lambda x: x[0], states)

        def step(carry: Any, inputs: Any) -> Any:
            g, loss = inputs
            outs, new = {}, {}
            for name, tx in txs.items():
                case = dc.CASES[name]
                kwargs = {"loss": loss} if case.needs_loss else {}
                p = params if case.needs_params else None
                outs[name], new[name] = tx.update(g, carry[name], p, **kwargs)
            history = jax.tree.map(lambda x: x[None], new) if local_state else new
            return new, (outs, history)

        _, (updates, history) = lax.scan(step, states, (grads, losses))
        return updates, history

    return txs, run


def _init_states(txs: dict[str, Any]) -> dict[str, Any]:
    return {name: tx.init(dc.params()) for name, tx in txs.items()}


def _per_device(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (dc.N_DEVICES, *np.shape(x))), tree
    )


def _record(names: list[str], updates: Any, history: Any, **extra: Any) -> dict[str, Any]:
    """Per case: per step, the update leaves (global arrays) and the state leaves."""
    out = {}
    for name in names:
        upd = [np.asarray(x) for x in jax.tree_util.tree_leaves(updates[name])]
        st = [np.asarray(x) for x in jax.tree_util.tree_leaves(history[name])]
        out[name] = {
            "updates": [[x[t] for x in upd] for t in range(dc.STEPS)],
            "state": [[x[t] for x in st] for t in range(dc.STEPS)],
            **extra,
        }
    return out


def _spec_entries(spec: P) -> tuple[Any, ...]:
    """A PartitionSpec as a tuple without trailing Nones (``P(None,)`` and ``P()`` agree)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def run_reference(names: list[str], lower_only: bool = False) -> dict[str, Any]:
    txs, run = _program(names, None, None, local_state=False)
    args = (_stacked_grads(), _init_states(txs), dc.params(), _losses())
    if lower_only:
        jax.jit(run).lower(*args)
        return {}
    updates, history = jax.jit(run)(*args)
    return _record(names, updates, history)


def run_gspmd(names: list[str], mesh: Any, lower_only: bool = False) -> dict[str, Any]:
    txs, run = _program(names, None, None, local_state=False)

    def put(tree: Any, specs: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

    args = (
        put(_stacked_grads(), STACKED_SPECS),
        jax.device_put(_init_states(txs), NamedSharding(mesh, P())),
        put(dc.params(), dc.SPECS),
        jax.device_put(_losses(), NamedSharding(mesh, P())),
    )
    lowered = jax.jit(run).lower(*args)
    if lower_only:
        return {}
    compiled = lowered.compile()
    updates, history = compiled(*args)
    out_specs = {
        name: [_spec_entries(x.sharding.spec) for x in jax.tree_util.tree_leaves(updates[name])]
        for name in names
    }
    hlo = compiled.as_text()
    return {
        name: {**rec, "hlo": hlo, "out_specs": out_specs[name]}
        for name, rec in _record(names, updates, history).items()
    }


def run_shard_map(
    names: list[str], mesh: Any, *, by_types: bool, lower_only: bool = False
) -> dict[str, Any]:
    txs, run = _program(names, AXES, dc.SPECS, local_state=not by_types, by_types=by_types)
    states = _init_states(txs)
    if by_types:
        state_in, state_out = P(), P(None)
        states = jax.device_put(states, NamedSharding(mesh, P()))
    else:
        state_in, state_out = ALL, P(None, AXES)
        states = jax.device_put(_per_device(states), NamedSharding(mesh, ALL))

    def put(tree: Any, specs: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

    mapped = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(STACKED_SPECS, state_in, dc.SPECS, P()),
        out_specs=({name: STACKED_SPECS for name in names}, state_out),
        check_vma=by_types,
    )
    args = (
        put(_stacked_grads(), STACKED_SPECS),
        states,
        put(dc.params(), dc.SPECS),
        jax.device_put(_losses(), NamedSharding(mesh, P())),
    )
    if lower_only:
        jax.jit(mapped).lower(*args)
        return {}
    updates, history = jax.jit(mapped)(*args)
    return _record(names, updates, history, per_device_state=not by_types)


def _split(x: np.ndarray, spec: P, offset: int = 0) -> np.ndarray:
    """Per-device blocks of a global array, stacked along a new leading axis."""
    dims = [d for d, entry in enumerate(spec) if entry is not None]
    if not dims:
        return np.stack([x] * dc.N_DEVICES)
    return np.stack(np.split(x, dc.N_DEVICES, axis=dims[0] + offset))


def _join(blocks: np.ndarray, spec: P) -> tuple[np.ndarray, bool]:
    """The global array (step axis first) from per-device blocks; do replicated copies agree?"""
    dims = [d for d, entry in enumerate(spec) if entry is not None]
    if not dims:
        return blocks[0], all(np.array_equal(b, blocks[0]) for b in blocks)
    return np.concatenate(list(blocks), axis=dims[0] + 1), True


def run_pmap(names: list[str], lower_only: bool = False) -> dict[str, Any]:
    specs = jax.tree.map(dc.pmap_spec, dc.SPECS)
    txs, run = _program(names, "i", specs, local_state=False)
    grads = jax.tree.map(lambda x, s: _split(x, s, offset=1), _stacked_grads(), specs)
    params = jax.tree.map(_split, dc.params(), specs)
    step = jax.pmap(run, axis_name="i", in_axes=(0, 0, 0, None))
    args = (grads, _per_device(_init_states(txs)), params, _losses())
    if lower_only:
        step.lower(*args)
        return {}
    updates, history = step(*args)
    agree = True
    joined = {}
    for name in names:
        pairs = [
            _join(np.asarray(b), s)
            for b, s in zip(
                jax.tree_util.tree_leaves(updates[name]),
                jax.tree_util.tree_leaves(specs),
                strict=True,
            )
        ]
        agree = agree and all(ok for _, ok in pairs)
        joined[name] = jax.tree_util.tree_unflatten(
            jax.tree.structure(updates[name]), [x for x, _ in pairs]
        )
    # The state history comes back as (device, step, ...); the test wants (step, device, ...).
    history = jax.tree.map(lambda x: np.swapaxes(np.asarray(x), 0, 1), history)
    return _record(names, joined, history, per_device_state=True, replicated_updates_agree=agree)


def norms_with_and_without_layout() -> dict[str, float]:
    """``global_norm`` under pmap of a tree with replicated leaves, with and without layout."""
    import optaxclip

    specs = jax.tree.map(dc.pmap_spec, dc.SPECS)
    blocks = jax.tree.map(_split, dc.grads(0), specs)

    def norms(g: Any) -> jax.Array:
        return jnp.stack(
            [
                optaxclip.global_norm(g, axis_name="i"),
                optaxclip.global_norm(g, axis_name="i", layout=specs),
            ]
        )

    values = np.asarray(jax.pmap(norms, axis_name="i")(blocks))
    return {"without_layout": float(values[0, 0]), "with_layout": float(values[0, 1])}


def _run_mode(mode: str, names: list[str], mesh: Any) -> dict[str, Any]:
    auto_mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(dc.MESH_SHAPE), AXES)
    runners = {
        "reference": lambda n, lo: run_reference(n, lo),
        "gspmd": lambda n, lo: run_gspmd(n, mesh, lo),
        "gspmd_auto": lambda n, lo: run_gspmd(n, auto_mesh, lo),
        "shard_map_types": lambda n, lo: run_shard_map(n, mesh, by_types=True, lower_only=lo),
        "shard_map_layout": lambda n, lo: run_shard_map(n, mesh, by_types=False, lower_only=lo),
        "pmap": lambda n, lo: run_pmap(n, lo),
    }
    try:
        return runners[mode](names, False)
    except Exception:
        if len(names) == 1:
            return {names[0]: {"error": traceback.format_exc(limit=-3)}}
    # Find the failing cases by lowering each alone (cheap: no XLA compile), then run the rest.
    out: dict[str, Any] = {}
    for name in names:
        try:
            runners[mode]([name], True)
        except Exception:
            out[name] = {"error": traceback.format_exc(limit=-3)}
    rest = [name for name in names if name not in out]
    if rest:
        out.update(_run_mode(mode, rest, mesh))
    return out


MODES = ("reference", "gspmd", "gspmd_auto", "shard_map_types", "shard_map_layout", "pmap")


def main(argv: list[str]) -> None:
    if jax.device_count() != dc.N_DEVICES:
        raise SystemExit(
            f"needs {dc.N_DEVICES} devices, found {jax.device_count()}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python."
        )
    out_path = argv[1]
    names = argv[2:] or list(dc.CASES)
    mesh = jax.make_mesh(dc.MESH_SHAPE, AXES, axis_types=(AxisType.Explicit,) * 2)
    results: dict[str, Any] = {"cases": {name: {} for name in names}, "seconds": {}}
    for mode in MODES:
        start = time.perf_counter()
        for name, record in _run_mode(mode, names, mesh).items():
            results["cases"][name][mode] = record
        results["seconds"][mode] = time.perf_counter() - start
    results["norms"] = norms_with_and_without_layout()
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv)
