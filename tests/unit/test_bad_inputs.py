"""Bad inputs that used to give silent wrong answers (or an error without the argument's name):
one table, one test, on each backend.

Each row of :data:`ROWS` is ``(id, call, exception, substring)``:

- ``id``: the test id (``"area-what"``);
- ``call``: a function of the backend name (``"jax"``, ``"torch"``) that feeds the bad input;
  it may call ``pytest.skip`` where the row does not apply to that backend;
- ``exception``: the exception type ``call`` must raise;
- ``substring``: text the message must contain, naming the argument (and the bad value).

Keep the rows tiny (a few elements, no training beyond one step). A row whose check needs JAX's
64-bit mode off runs its code in a fresh interpreter (:func:`_x64_off`), which re-raises the
error here.
"""

from __future__ import annotations

import builtins
import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.data import Dataset
from duogard.parity import ParityReport, compare_backends


def _arr(name, values, dtype=None):
    return dg.backend(name).asarray(np.asarray(values, dtype))


def _apply(layer, name, params_shape, input_shape):
    """``layer`` initialised for ``params_shape``, applied to zeros of ``input_shape`` on ``name``."""
    params = dg.tree.tree_map(dg.backend(name).asarray, layer.init(0, params_shape))
    return layer.apply(params, _arr(name, np.zeros(input_shape, np.float32)))


def _tiny_data(num_classes=3):
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.arange(8) % num_classes
    return Dataset("tiny", x, y, x[:4], y[:4], num_classes)


def _fit_with_labels(name, label):
    data = copy.copy(_tiny_data())
    data.y_train = np.full(8, label)  # past Dataset's own check, as a later mutation is
    model = nn.Sequential(nn.Linear(3))
    return dg.fit(model, model.init(0, data.example_input), data, backend=name, steps=5, batch_size=4,
                  callbacks=[])  # fmt: skip


def _compare(**kw):
    """``parity.compare_backends`` with placeholder model, optimizer and data: the argument checks
    come first."""
    return compare_backends(None, "cross_entropy", None, "backprop", None, **kw)


def _convert(name, leaf, **kw):
    return dg.convert({"w": leaf}, to=name, **kw)


def _jax():
    return pytest.importorskip("jax")


def _torch():
    return pytest.importorskip("torch")


def _jax_only(name):
    if name != "jax":
        pytest.skip("JAX's 64-bit mode only: the other backends keep 64-bit values")
    _jax()


def _x64_off(code: str) -> None:
    """Run ``code`` in a fresh interpreter with JAX's 64-bit mode off; raise here the exception
    (type and message) it raised there, or nothing if it raised none.
    """
    runner = textwrap.dedent(
        """
        import json, sys
        try:
            exec(sys.argv[1], {})
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc)]))
        else:
            print(json.dumps(None))
        """
    )
    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    out = subprocess.run([sys.executable, "-c", runner, textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    raised = json.loads(out.stdout.strip().splitlines()[-1])
    if raised is not None:
        raise getattr(builtins, raised[0], RuntimeError)(raised[1])


_FIT_64 = """
    import numpy as np, duogard as dg
    from duogard import nn
    from duogard.data import Dataset
    x = np.zeros((8, 4), {x_dtype!r}); y = np.arange(8) % 3
    model = nn.Sequential(nn.Linear(3))
    params = model.init(0, x[:2], dtype={p_dtype!r})
    dg.fit(model, params, Dataset("tiny", x, y, x[:4], y[:4], 3), backend="jax", steps=1, batch_size=4,
           callbacks=[])
"""

_CONVERT_BIG_INT = """
    import numpy as np, duogard as dg
    dg.convert({"w": np.array([2**40, 1])}, to="jax", allow_downcast=True)  # a torch source: test_interop
"""


def _loss_of(name, loss, estimator="forward"):
    """``estimator`` on a tiny Linear model whose loss is ``loss(logits, labels)``."""
    be = dg.backend(name)
    model = nn.Sequential(nn.Linear(3))
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    params = dg.tree.tree_map(be.asarray, model.init(0, x))
    loss_fn = dg.grad.supervised(model, loss)
    return dg.estimator(estimator)(loss_fn, params, (be.asarray(x), be.asarray(np.arange(4) % 3)), be.key(0))


def _int_loss(out, y, reduction="mean"):
    xp = dg.backend_of(out).xp
    return xp.sum(xp.astype(out * 100, xp.int32))  # a count: no gradient


def _vector_loss(out, y, reduction="mean"):
    return losses.cross_entropy(out, y, reduction="none")  # forgot to reduce


def _threads_from(name, value):
    """``threads_for`` of backend ``name`` with ``$DUOGARD_TORCH_THREADS`` set to ``value``."""
    before = os.environ.get("DUOGARD_TORCH_THREADS")
    os.environ["DUOGARD_TORCH_THREADS"] = value
    try:
        if name != "torch":
            pytest.skip("DUOGARD_TORCH_THREADS is torch's")
        return dg.backend(name).threads_for(1e6)
    finally:
        if before is None:
            del os.environ["DUOGARD_TORCH_THREADS"]
        else:
            os.environ["DUOGARD_TORCH_THREADS"] = before


def _schedule_for_arrays(step):
    """A schedule written for arrays only (it reads ``step.ndim``): checked when the state is made."""
    return 0.0 * step.ndim - 1.0


ROWS = [
    # 1. integer labels outside [0, C) counted as 0
    ("cross_entropy-label-10", lambda b: losses.cross_entropy(_arr(b, np.zeros((4, 10))), _arr(b, [10] * 4)),
     ValueError, "cross_entropy: labels must be in [0, 10), got 10 (at index 0)"),
    ("cross_entropy-label-minus-1",
     lambda b: losses.cross_entropy(_arr(b, np.zeros((4, 10))), _arr(b, [0, 1, -1, 2])),
     ValueError, "cross_entropy: labels must be in [0, 10), got -1 (at index 2)"),
    ("cross_entropy-smoothing-label-10",
     lambda b: losses.cross_entropy(_arr(b, np.zeros((2, 3))), _arr(b, [0, 3]), label_smoothing=0.1),
     ValueError, "cross_entropy: labels must be in [0, 3), got 3 (at index 1)"),
    ("nll_loss-label-10", lambda b: losses.nll_loss(_arr(b, np.full((4, 10), -2.3)), _arr(b, [10] * 4)),
     ValueError, "nll_loss: labels must be in [0, 10), got 10"),
    ("fit-label-past-outputs", lambda b: _fit_with_labels(b, 3),
     ValueError, "fit: data.y_train holds label 3; labels must be in [0, 3)"),
    ("fit-label-negative", lambda b: _fit_with_labels(b, -1),
     ValueError, "fit: data.y_train holds label -1"),
    # 2. negative learning rates: gradient ascent
    ("sgd-exponential_decay-negative", lambda b: optim.sgd(optim.exponential_decay(-0.1, rate=0)),
     ValueError, "exponential_decay: init_value must be >= 0, got -0.1"),
    ("step_decay-negative", lambda b: optim.step_decay(-0.1, step_size=2),
     ValueError, "step_decay: init_value must be >= 0"),
    ("cosine_decay-negative", lambda b: optim.cosine_decay(-0.1, decay_steps=5),
     ValueError, "cosine_decay: init_value must be >= 0"),
    ("warmup_cosine_decay-negative-end",
     lambda b: optim.warmup_cosine_decay(0.1, warmup_steps=1, decay_steps=5, end_value=-0.1),
     ValueError, "warmup_cosine_decay: end_value must be >= 0"),
    ("constant_schedule-negative", lambda b: optim.constant_schedule(-1.0),
     ValueError, "constant_schedule: value must be >= 0"),
    ("sgd-callable-negative", lambda b: optim.sgd(lambda s: -1.0),
     ValueError, "sgd: learning_rate schedule gave -1.0 at step 0; expected a finite number >= 0"),
    ("sgd-momentum-callable-negative", lambda b: optim.sgd(lambda s: -1.0, momentum=0.9),
     ValueError, "sgd: learning_rate schedule gave -1.0 at step 0"),
    ("adam-callable-negative", lambda b: optim.adam(lambda s: -1.0),
     ValueError, "adam: learning_rate schedule gave -1.0 at step 0"),
    ("adamw-callable-negative", lambda b: optim.adamw(lambda s: -1.0),
     ValueError, "adamw: learning_rate schedule gave -1.0 at step 0"),
    ("rmsprop-callable-nan", lambda b: optim.rmsprop(lambda s: math.nan),
     ValueError, "rmsprop: learning_rate schedule gave nan at step 0"),
    ("adagrad-callable-negative", lambda b: optim.adagrad(lambda s: -1.0, lr_decay=0.1),
     ValueError, "adagrad: learning_rate schedule gave -1.0 at step 0"),
    ("sgd-array-schedule-negative-at-init",
     lambda b: optim.sgd(_schedule_for_arrays).init({"w": _arr(b, [1.0])}),
     ValueError, "scale_by_learning_rate: learning_rate schedule gave -1.0 at step 0"),
    # 4. parity's arguments
    ("parity-tol-nan", lambda b: _compare(tol=math.nan),
     ValueError, "parity: tol must be a finite number > 0, got nan"),
    ("parity-tol-negative", lambda b: _compare(tol=-1),
     ValueError, "parity: tol must be a finite number > 0, got -1"),
    ("parity-one-backend", lambda b: _compare(backends=(b,)),
     ValueError, "parity: backends must name exactly two backends"),
    ("parity-backends-string", lambda b: _compare(backends="ab"),
     ValueError, "parity: backends must name exactly two backends"),
    ("parity-steps-zero", lambda b: _compare(steps=0),
     ValueError, "parity: steps must be a positive int, got 0"),
    ("parity-table-every-zero", lambda b: ParityReport(("jax", "torch"), "float32", 1e-4).table(every=0),
     ValueError, "ParityReport.table: every must be a positive int, got 0"),
    # 5. float64 on JAX without 64-bit mode (a fresh interpreter)
    ("fit-float64-params-x64-off",
     lambda b: (_jax_only(b), _x64_off(_FIT_64.format(x_dtype="float32", p_dtype="float64"))),
     TypeError, "Trainer.init_state: params are float64"),
    ("fit-float64-data-x64-off",
     lambda b: (_jax_only(b), _x64_off(_FIT_64.format(x_dtype="float64", p_dtype="float32"))),
     TypeError, "fit: data.x_train are float64, which jax cannot hold now"),
    # 6. inputs smaller than the kernel
    ("conv2d-input-smaller-than-kernel", lambda b: _apply(nn.Conv2d(2, 3), b, (1, 1, 5, 5), (1, 1, 2, 2)),
     ValueError, "Conv2d(2, (3, 3)): input spatial size (2, 2)"),
    ("conv2d-dilated-kernel", lambda b: _apply(nn.Conv2d(2, 2, dilation=3), b, (1, 1, 6, 6), (1, 1, 3, 3)),
     ValueError, "kernel_size (2, 2) with padding ((0, 0), (0, 0)) and dilation (3, 3)"),
    ("maxpool2d-input-smaller-than-window", lambda b: _apply(nn.MaxPool2d(3), b, (1, 1, 6, 6), (1, 1, 2, 2)),
     ValueError, "MaxPool2d((3, 3)): input spatial size (2, 2)"),
    ("avgpool2d-input-smaller-than-window", lambda b: _apply(nn.AvgPool2d(3), b, (1, 1, 6, 6), (1, 1, 2, 2)),
     ValueError, "AvgPool2d((3, 3)): input spatial size (2, 2)"),
    # 7. convert: values that do not fit, and leaves it cannot move
    ("convert-int64-past-int32-x64-off",
     lambda b: (_jax_only(b), _x64_off(_CONVERT_BIG_INT)),
     ValueError, "leaf 'w' holds int64 values in [1, 1099511627776], outside the int32 range"),
    ("convert-typed-jax-key", lambda b: _convert(b, _jax().random.key(0)),
     TypeError, "leaf 'w' is of dtype key<fry> (a typed JAX PRNG key"),
    ("convert-numpy-strings", lambda b: _convert(b, np.array(["a"])),
     TypeError, "leaf 'w' is a NumPy array of strings"),
    ("convert-numpy-datetimes", lambda b: _convert(b, np.array(["2020-01-01"], "datetime64[D]")),
     TypeError, "leaf 'w' is a NumPy array of datetimes"),
    ("convert-float8", lambda b: _convert(b, _jax().numpy.zeros(2, _jax().numpy.float8_e4m3fn)),
     TypeError, "leaf 'w' is of dtype float8_e4m3fn; convert moves arrays of bool"),
    ("convert-sparse-torch", lambda b: _convert(b, _torch().eye(3).to_sparse()),
     TypeError, "leaf 'w' is a sparse_coo torch tensor"),
    # 8. estimator options: a string where a bool or an int is expected ("false" is truthy)
    ("forward-lean-string", lambda b: dg.estimator("forward", lean="false"),
     TypeError, "forward: lean must be True or False, got str 'false'"),
    ("forward-projection-string", lambda b: dg.estimator("forward", projection="no"),
     TypeError, "forward: projection must be True or False, got str 'no'"),
    ("forward-orthogonal-string", lambda b: dg.estimator("forward", orthogonal="no"),
     TypeError, "forward: orthogonal must be True or False, got str 'no'"),
    ("forward-orthogonal-int", lambda b: dg.estimator("forward", orthogonal=1),
     TypeError, "forward: orthogonal must be True or False, got int 1"),
    ("forward-activity-layerwise-string", lambda b: dg.estimator("forward-activity", layerwise="no"),
     TypeError, "forward-activity: layerwise must be True or False, got str 'no'"),
    ("forward-num_tangents-string", lambda b: dg.estimator("forward", num_tangents="4"),
     TypeError, "forward: num_tangents must be a positive int, got str '4'"),
    ("forward-exact-chunk_size-none", lambda b: dg.estimator("forward-exact", chunk_size=None),
     TypeError, "forward-exact: chunk_size must be a positive int, got NoneType None"),
    # 9. losses that cannot be differentiated: integer-valued (torch trained on a zero gradient),
    # not a scalar (forward mode failed in a reshape)
    ("backprop-integer-loss", lambda b: _loss_of(b, _int_loss, "backprop"),
     TypeError, "backprop: the loss must be a floating-point scalar to be differentiated, got int"),
    ("forward-integer-loss", lambda b: _loss_of(b, _int_loss, "forward"),
     TypeError, "forward: the loss must be a floating-point scalar to be differentiated, got int"),
    ("forward-exact-integer-loss", lambda b: _loss_of(b, _int_loss, "forward-exact"),
     TypeError, "forward-exact: the loss must be a floating-point scalar"),
    ("forward-activity-scalar-per-example-loss", lambda b: _loss_of(b, _int_loss, "forward-activity"),
     ValueError, "forward-activity: the loss with reduction='none' must give one value per example"),
    ("forward-vector-loss", lambda b: _loss_of(b, _vector_loss, "forward"),
     ValueError, "forward: the loss must be a scalar (0-d), got an array of shape (4,)"),
    ("backprop-vector-loss", lambda b: _loss_of(b, _vector_loss, "backprop"),
     ValueError, "backprop: the loss must be a scalar (0-d), got an array of shape (4,)"),
    # 10. the thread count of $DUOGARD_TORCH_THREADS (100000 crashed torch; the others named no variable)
    *[(f"torch-threads-{v}", lambda b, v=v: _threads_from(b, v), ValueError,
       f"$DUOGARD_TORCH_THREADS must be a positive int of at most 1024 threads, got '{v}'")
      for v in ("100000", "0", "-1", "abc", "2.5")],
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_raises_naming_the_argument(be, row):
    _, call, exception, substring = row
    with pytest.raises(exception) as info:
        call(be.name)
    assert substring in str(info.value), str(info.value)


@pytest.mark.parametrize("options", [{}, {"tangents": "rank1"}, {"num_tangents": 3}, {"jvp": "framework"},
                                     {"num_tangents": 3, "projection": True}])  # fmt: skip
def test_forward_takes_float16_params_with_float32_data_as_backprop_does(be, options):
    """Backprop computes in the promoted dtype and returns gradients in the params' dtype;
    forward gradients (rules and framework paths) do the same instead of failing in a matmul.
    (The native generator: float16 draws of the portable one are another issue.)"""
    model = nn.Sequential(nn.Linear(5), nn.relu, nn.Linear(3))
    x = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    params = dg.tree.tree_map(be.asarray, model.init(0, x, dtype="float16"))
    batch = (be.asarray(x), be.asarray(np.arange(4) % 3))
    loss_fn = dg.grad.supervised(model, losses.cross_entropy)
    want, _ = dg.estimator("backprop")(loss_fn, params, batch)
    loss, grads = dg.estimator("forward", generator="native", **options)(loss_fn, params, batch, be.key(0))
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    for g, p in zip(dg.tree.tree_leaves(grads), dg.tree.tree_leaves(params)):
        assert be.dtype_name(g.dtype) == "float16" and tuple(g.shape) == tuple(p.shape)
        assert np.isfinite(np.asarray(be.to_numpy(g), np.float32)).all()


def test_big_endian_numpy_input_works_as_native(be):
    """Big-endian NumPy arrays (as read from files) are copied to native byte order by asarray,
    stage, convert and fit, instead of failing deep inside DLPack or jit."""
    big = np.arange(4, dtype=">f4")
    for moved in (be.asarray(big), be.stage(big), dg.convert({"w": big}, to=be.name)["w"]):
        assert np.asarray(be.to_numpy(moved)).tolist() == [0, 1, 2, 3]
        assert be.dtype_name(moved.dtype) == "float32"
    with pytest.raises(ValueError, match=r"leaf 'w' needs a copy \(it is in non-native byte order \(>f4\)\)"):
        dg.convert({"w": big}, to=be.name, copy=False)
    data = _tiny_data()
    x, y = data.x_train.astype(">f4"), data.y_train.astype(">i8")
    swapped = Dataset("tiny", x, y, x[:4], y[:4], 3)
    model = nn.Sequential(nn.Linear(3))
    runs = [
        dg.fit(model, model.init(0, d.example_input), d, backend=be.name, steps=2, batch_size=4, callbacks=[])
        for d in (data, swapped)
    ]
    assert [h["loss"] for h in runs[1].history] == [h["loss"] for h in runs[0].history]
