"""Shared test setup: the hypothesis profile and the ``eager_ops`` fixture.

What the test modules share besides fixtures lives in ``helpers/``, imported as
``from helpers.references import ...`` (float64 references and tolerances),
``from helpers.strategies import ...`` (hypothesis strategies), ``from helpers.runs import ...``
(drivers of transformations) and ``from helpers.guards import ...`` (the recorded run of the
guards' tests). pytest puts this directory on ``sys.path``, so ``helpers`` imports as a
package, in the main process and in every xdist worker.

``HYPOTHESIS_PROFILE=thorough`` runs 200 examples per property instead of 25.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "optaxclip",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("optaxclip"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optaxclip"))


@pytest.fixture
def eager_ops() -> Iterator[None]:
    """Runs a test op by op under ``jax.disable_jit()``.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("eager_ops")``; a test that
    checks real compilation switches it back on with ``jax.disable_jit(False)``.
    """
    with jax.disable_jit():
        yield
