"""A loss with a cliff: why an unclipped gradient step can throw training far away.

Two parameters, so the whole story fits in one picture (the situation drawn in Goodfellow,
Bengio & Courville, *Deep Learning*, figure 8.3, and in Pascanu et al. 2013, figure 6):
a smooth basin whose minimum lies at the foot of a steep wall. SGD with momentum slides
down the basin, overshoots onto the wall, and the wall's gradient, hundreds of times larger
than anything before, catapults the parameters far out onto the flat plateau, where the
gradient vanishes and training never comes back. The same run with
``optaxclip.clip_by_global_norm`` takes a bounded step on the wall and settles in the
minimum.

A second figure shows the cliff that a real recurrent network has: the loss of a one-unit
RNN ``x_t = w * sigmoid(x_{t-1}) + b`` after 50 steps, as a function of ``(w, b)``, the
example Pascanu et al. used.

Writes into ``--out`` (default ``examples/output/cliff/``): ``cliff.png`` (gradient field as a
quiver plot, both trajectories, loss and step length per step), ``rnn_cliff.png`` and
``summary.json``.

References:
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013 (https://arxiv.org/abs/1211.5063), section 3 and figure 6.
  Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016, section 10.11.1.
"""

from __future__ import annotations

import argparse
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

BASIN_WIDTH = 2.0  # the basin is 1 - exp(-r^2 / (2 * width^2)): flat (loss ~1) far out
WALL_SLOPE = 40.0  # the wall's gradient, against at most ~0.3 anywhere in the basin
WALL_SHARPNESS = 10.0
WALL_AT = 0.3  # the wall rises where y > WALL_AT
START = (-2.0, -4.0)
VIEW = (-6.0, 6.0, -6.0, 2.0)  # x_min, x_max, y_min, y_max of the plots


def cliff_loss(p: jax.Array) -> jax.Array:
    """A basin with its minimum at the foot of a wall (steep only for y > WALL_AT)."""
    x, y = p[0], p[1]
    basin = 1.0 - jnp.exp(-(x**2 + y**2) / (2 * BASIN_WIDTH**2))
    wall = WALL_SLOPE * jax.nn.softplus(WALL_SHARPNESS * (y - WALL_AT)) / WALL_SHARPNESS
    return basin + wall


def one_unit_rnn_loss(p: jax.Array, steps: int = 50, x0: float = 0.5, target: float = 0.7) -> Any:
    """Squared error of a one-unit RNN after ``steps`` steps (Pascanu et al., section 3)."""
    w, b = p[0], p[1]

    def step(x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return w * jax.nn.sigmoid(x) + b, None

    x, _ = jax.lax.scan(step, jnp.asarray(x0, p.dtype), None, length=steps)
    return (x - target) ** 2


def trajectory(
    loss_fn: Any, tx: optax.GradientTransformation, start: jax.Array, steps: int
) -> dict[str, np.ndarray]:
    """Runs ``steps`` optimizer steps; returns the points, losses and gradient norms."""

    def body(carry: Any, _: None) -> tuple[Any, tuple[jax.Array, jax.Array, jax.Array]]:
        p, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grad, state, p)
        return (optax.apply_updates(p, updates), state), (p, loss, optaxclip.global_norm(grad))

    (last, _), (points, losses, norms) = jax.jit(
        lambda s: jax.lax.scan(body, (s, tx.init(s)), None, length=steps)
    )(start)
    points = np.concatenate([np.asarray(points), np.asarray(last)[None]], axis=0)
    return {
        "points": points,
        "loss": np.append(np.asarray(losses), float(loss_fn(last))),
        "grad_norm": np.asarray(norms),
        "step_length": np.linalg.norm(np.diff(points, axis=0), axis=1),
    }


def grid_values(loss_fn: Any, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """Loss and gradient on a grid (vectorised with vmap)."""
    xx, yy = np.meshgrid(xs, ys)
    pts = jnp.stack([xx.ravel(), yy.ravel()], axis=1).astype(jnp.float32)
    loss, grad = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))(pts)
    shape = xx.shape
    return (
        xx,
        yy,
        np.asarray(loss).reshape(shape),
        np.asarray(grad[:, 0]).reshape(shape),
        np.asarray(grad[:, 1]).reshape(shape),
    )


def draw_field(ax: Any, loss_fn: Any, view: tuple[float, ...], fine: int, coarse: int) -> Any:
    """Colour: log10 of the gradient norm; white lines: loss contours; arrows: downhill."""
    x0, x1, y0, y1 = view
    xx, yy, loss, gx, gy = grid_values(
        loss_fn, np.linspace(x0, x1, fine), np.linspace(y0, y1, fine)
    )
    image = ax.pcolormesh(xx, yy, np.log10(np.hypot(gx, gy) + 1e-6), shading="auto", cmap="magma")
    levels = np.quantile(loss, [0.02, 0.1, 0.25, 0.5, 0.75])
    ax.contour(xx, yy, loss, levels=np.unique(levels), colors="white", linewidths=0.6, alpha=0.6)
    qx, qy, _, gx, gy = grid_values(
        loss_fn, np.linspace(x0, x1, coarse), np.linspace(y0, y1, coarse)
    )
    norm = np.hypot(gx, gy)
    safe = np.where(norm > 0, norm, 1.0)
    # Arrows point downhill (where SGD moves) with a normalised length, so that the field
    # stays readable; the background colour carries the magnitude.
    ax.quiver(qx, qy, -gx / safe, -gy / safe, color="lightgrey", scale=32, width=0.003)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    return image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument(
        "--max-norm", type=float, default=1.0, help="clip_by_global_norm threshold (default 1)"
    )
    parser.add_argument(
        "--out",
        default=str(_common.DEFAULT_OUTPUT / "cliff"),
        help="output folder (default examples/output/cliff)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: coarser grids")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = _common.output_dir(args.out)
    plt = _common.pyplot()
    fine, coarse = (60, 12) if args.quick else (240, 22)
    start = jnp.asarray(START, jnp.float32)
    optimizers = {
        "no clipping": optax.sgd(args.lr, momentum=args.momentum),
        f"clip_by_global_norm({args.max_norm:g})": optax.chain(
            optaxclip.clip_by_global_norm(args.max_norm),
            optax.sgd(args.lr, momentum=args.momentum),
        ),
    }
    runs = {name: trajectory(cliff_loss, tx, start, args.steps) for name, tx in optimizers.items()}

    fig, (ax_field, ax_loss, ax_step) = plt.subplots(
        1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.35, 1, 1]}
    )
    image = draw_field(ax_field, cliff_loss, VIEW, fine, coarse)
    fig.colorbar(image, ax=ax_field, label="log10 |gradient|", fraction=0.046)
    colors = {"no clipping": "red"}
    rows = []
    for name, run in runs.items():
        color = colors.get(name, "deepskyblue")
        pts = run["points"]
        ax_field.plot(pts[:, 0], pts[:, 1], "o-", ms=2.5, lw=1.2, color=color, label=name)
        jump = int(np.argmax(run["step_length"]))
        x0, x1, y0, y1 = VIEW
        end = pts[-1]
        if not (x0 <= end[0] <= x1 and y0 <= end[1] <= y1):
            ax_field.annotate(
                f"thrown to ({end[0]:.0f}, {end[1]:.0f})\nloss {run['loss'][-1]:.2f}",
                xy=(np.clip(end[0], x0, x1), y0),
                xytext=(0.52, 0.08),
                textcoords="axes fraction",
                color=color,
                arrowprops={"arrowstyle": "->", "color": color},
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": color},
                fontsize=8,
            )
        steps = np.arange(len(run["loss"]))
        ax_loss.plot(steps, run["loss"], color="C3" if color == "red" else "C0", label=name)
        ax_step.plot(
            np.arange(1, len(run["step_length"]) + 1),
            run["step_length"],
            color="C3" if color == "red" else "C0",
            label=name,
        )
        rows.append(
            {
                "method": name,
                "final_loss": float(run["loss"][-1]),
                "final_losses": [float(run["loss"][-1])],
                "final_point": pts[-1].tolist(),
                "largest_step": float(run["step_length"][jump]),
                "largest_step_at": jump + 1,
                "largest_grad_norm": float(np.max(run["grad_norm"])),
            }
        )
    ax_field.plot(*START, "k*", ms=12, label="start")
    ax_field.set_title("|gradient| (colour), loss contours, downhill arrows", fontsize=10)
    ax_field.set_xlabel("parameter 1")
    ax_field.set_ylabel("parameter 2")
    ax_field.legend(loc="upper left", fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_title("Loss per step")
    ax_loss.set_xlabel("step")
    ax_loss.legend(fontsize=8)
    ax_step.set_yscale("log")
    ax_step.set_title("Length of each parameter step")
    ax_step.set_xlabel("step")
    fig.suptitle(
        f"SGD (lr {args.lr}, momentum {args.momentum}) into a minimum at the foot of a cliff"
    )
    fig.tight_layout()
    files = [_common.save_figure(fig, out / "cliff.png")]

    # The cliff of a real recurrent network: one unit, 50 steps, loss over (w, b).
    rnn_view = (-2.0, 10.0, -6.0, 2.0)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    image = draw_field(ax, one_unit_rnn_loss, rnn_view, fine, coarse)
    fig.colorbar(image, ax=ax, label="log10 |gradient|", fraction=0.046)
    _, _, _, gx, gy = grid_values(
        one_unit_rnn_loss, np.linspace(*rnn_view[:2], fine), np.linspace(*rnn_view[2:], fine)
    )
    rnn_norms = np.hypot(gx, gy)
    ax.set_title(
        "One-unit RNN x_t = w·sigmoid(x_{t-1}) + b: loss (x_50 - 0.7)^2 has a cliff", fontsize=10
    )
    ax.set_xlabel("w")
    ax.set_ylabel("b")
    fig.tight_layout()
    files.append(_common.save_figure(fig, out / "rnn_cliff.png"))

    print(
        _common.markdown_table(
            ["method", "final loss", "final point", "largest step (at step)", "largest |grad|"],
            [
                [
                    r["method"],
                    _common.fmt(r["final_loss"]),
                    "({:.2f}, {:.2f})".format(*r["final_point"]),
                    f"{r['largest_step']:.2f} ({r['largest_step_at']})",
                    _common.fmt(r["largest_grad_norm"], ".3g"),
                ]
                for r in rows
            ],
        )
    )
    print(
        f"one-unit RNN: gradient norm on the grid ranges over "
        f"{np.percentile(rnn_norms, 50):.3g} (median) to {rnn_norms.max():.3g} (max)"
    )
    summary = {
        "example": "cliff",
        "config": vars(args),
        "methods": {r["method"]: r for r in rows},
        "clipped_methods": [r["method"] for r in rows if r["method"] != "no clipping"],
        "rnn_grad_norm_median": float(np.median(rnn_norms)),
        "rnn_grad_norm_max": float(rnn_norms.max()),
        "files": [f.name for f in files],
    }
    _common.write_summary(out, summary)
    print("wrote " + ", ".join(str(f) for f in [*files, out / "summary.json"]))
    return summary


if __name__ == "__main__":
    main()
