"""``convert`` with two JAX CPU devices (``--xla_force_host_platform_device_count=2``, which JAX
reads when it starts: hence a fresh process).

DLPack names every JAX CPU device CPU 0, so convert once put every result on ``cpu:0`` whatever
``device=`` asked for, and took a tree with leaves on ``cpu:0`` and ``cpu:1`` as one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import AVAILABLE, child_pythonpath

pytestmark = pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs both jax and torch")

CODE = """
import jax, jax.numpy as jnp, numpy as np, torch
import duogard as dg

d0, d1 = jax.devices("cpu")
on1 = jax.device_put(jnp.arange(3.0), d1)
where = lambda a: next(iter(a.devices()))

# torch -> JAX, NumPy -> JAX and JAX -> JAX land on the device asked for, by name or by object
for src in (torch.arange(3.0), np.arange(3, dtype=np.float32), jnp.arange(3.0)):
    for dev in ("cpu:1", d1):
        out = dg.convert(src, to="jax", device=dev)
        assert where(out) == d1, (type(src).__name__, dev, out.devices())
        assert out.tolist() == [0.0, 1.0, 2.0]
    assert where(dg.convert(src, to="jax", device="cpu")) == d0
assert where(dg.convert(on1, to="jax", device="cpu:0")) == d0
assert dg.convert(on1, to="jax", device="cpu:1") is on1  # already there: nothing moves
tree = dg.convert({"t": torch.ones(2), "j": jnp.ones(2), "k": on1}, to="jax", device="cpu:1")
assert all(where(v) == d1 for v in tree.values()), tree

# moving between JAX's CPU devices is a copy: copy=False refuses it
try:
    dg.convert(torch.ones(2), to="jax", device="cpu:1", copy=False)
except ValueError as exc:
    assert "a move from cpu to cpu:1" in str(exc), exc
else:
    raise AssertionError("copy=False moved a tensor to cpu:1")

# a tree on two devices: refused, naming the leaves, their devices and the argument
for to in ("jax", "torch", "numpy"):
    try:
        dg.convert({"a": jnp.ones(2), "b": on1}, to=to)
    except ValueError as exc:
        text = str(exc)
        assert "different devices" in text and "'a' on cpu" in text and "'b' on cpu:1" in text, text
        assert "device=" in text, text
    else:
        raise AssertionError(f"a tree on cpu:0 and cpu:1 was accepted (to={to})")

# PyTorch and NumPy hold host memory as one device: from any JAX CPU device, no copy
t = dg.convert(on1, to="torch", device="cpu", copy=False)
assert t.data_ptr() == on1.unsafe_buffer_pointer()
assert dg.convert(on1, to="numpy", copy=False).ctypes.data == on1.unsafe_buffer_pointer()
mixed = dg.convert({"a": jnp.ones(2), "b": on1}, to="torch", device="cpu")
assert mixed["b"].data_ptr() == on1.unsafe_buffer_pointer()

# a CPU device JAX does not have
try:
    dg.convert(torch.ones(2), to="jax", device="cpu:5")
except ValueError as exc:
    assert "cpu:5" in str(exc) and "2 CPU devices" in str(exc), exc
else:
    raise AssertionError("cpu:5 accepted with two CPU devices")
print("devices OK")
"""


def test_convert_honours_a_second_jax_cpu_device_and_refuses_a_tree_on_two():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": child_pythonpath(),
    }
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CODE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "devices OK" in out.stdout
