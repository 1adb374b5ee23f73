"""Helpers for users' own tests: one-line cross-backend parity assertions."""

from __future__ import annotations

from duogard.backend import DEFAULT_PAIR
from duogard.parity import compare_backends

__all__ = ["assert_backends_agree"]


def assert_backends_agree(
    model,
    loss,
    optimizer,
    estimator,
    data,
    *,
    steps: int = 20,
    backends=DEFAULT_PAIR,
    dtype: str = "float32",
    rtol: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
):
    """Assert that two backends train ``model`` identically (shared batches and tangents).

    Raises AssertionError naming the first step that diverged, the leaf, and how far (the
    relative difference against ``rtol``); returns the :class:`duogard.parity.ParityReport`
    otherwise. pytest shows the message as is.
    """
    report = compare_backends(
        model,
        loss,
        optimizer,
        estimator,
        data,
        steps=steps,
        backends=backends,
        seed=seed,
        batch_size=batch_size,
        dtype=dtype,
        tol=rtol,
    )
    if report.first_divergence is not None:
        r = report.records[report.first_divergence - 1]
        a, b = report.backends
        raise AssertionError(
            f"backends {a} and {b} diverge at step {r['step']} of {steps}: leaf {r['worst_leaf']!r}, "
            f"relative param difference {r['param_rel']:.3e}, relative grad difference {r['grad_rel']:.3e} "
            f"(rtol {report.tol:g}); max abs param difference {r['param_max_abs']:.3e}; "
            f"loss {a}={r['loss_a']:.8g}, {b}={r['loss_b']:.8g}"
        )
    return report
