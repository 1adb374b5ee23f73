"""Datasets (digits, IDX mnist/fashion-mnist, synthetic), batching, Beale/Rosenbrock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from duogard import data


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0)


@pytest.fixture(scope="module")
def sk_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _sorted_rows(x):
    x = x.reshape(len(x), -1)
    return x[np.lexsort(x.T[::-1])]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_scale_and_split(digits, sk_digits):
    images, target = sk_digits
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.x_train.shape[1:] == (1, 8, 8) == digits.input_shape
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.num_train + digits.num_test == 1797
    assert digits.example_input.shape == (2, 1, 8, 8)
    assert 0.0 == digits.x_train.min() and digits.x_train.max() == 1.0
    # train + test together are exactly sklearn's images / 16 (no example lost or duplicated)
    both = np.concatenate([digits.x_train, digits.x_test]).astype(np.float64)
    np.testing.assert_array_equal(_sorted_rows(both), _sorted_rows(images / 16.0))
    # stratified: each class sends round(20%) of its examples to the test set
    counts = np.bincount(target, minlength=10)
    np.testing.assert_array_equal(np.bincount(digits.y_test, minlength=10), np.round(counts * 0.2))
    # labels follow their images: a test image's label is sklearn's label for that image
    lookup = {images[i].tobytes(): target[i] for i in range(len(target))}
    for x, y in zip(digits.x_test[:50].astype(np.float64) * 16, digits.y_test[:50]):
        assert lookup[x.reshape(8, 8).tobytes()] == y


def test_digits_file_read_is_load_digits(sk_digits):
    """The digits are read from the file scikit-learn ships, without importing it: the very
    images and targets ``load_digits`` gives, in its order."""
    from duogard.data._load import _digits_from_file

    images, target = _digits_from_file()
    assert images is not None, "sklearn/datasets/data/digits.csv.gz not found"
    np.testing.assert_array_equal(images, sk_digits[0])
    np.testing.assert_array_equal(target, sk_digits[1])


def test_digits_is_deterministic_and_seeded(digits):
    again = data.load("digits", seed=0)
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    other = data.load("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)


def test_digits_flatten_dtype_and_limits(digits):
    flat = data.load("digits", flatten=True, dtype="float64", max_train=100, max_test=30)
    assert flat.x_train.shape == (100, 64) and flat.x_test.shape == (30, 64)
    assert flat.input_shape == (64,) and flat.x_train.dtype == np.float64
    np.testing.assert_array_equal(flat.x_train, digits.x_train[:100].reshape(100, 64))
    np.testing.assert_array_equal(digits.flattened().x_test, digits.x_test.reshape(-1, 64))
    assert data.load("digits", test_fraction=0.5).num_test in range(895, 905)


def test_load_errors():
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'cifar'.*'digits'.*'mnist'.*"
        r"'fashion-mnist'.*'synthetic'",
    ):
        data.load("cifar")
    assert data.DATASETS == ("digits", "mnist", "fashion-mnist", "synthetic")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64', got 'int8'"):
        data.load("digits", dtype="int8")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['hidden'\]"):
        data.load("digits", hidden=3)
    with pytest.raises(ValueError, match="test_fraction must be a float in \\(0, 1\\), got 1.5"):
        data.load("digits", test_fraction=1.5)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        data.load("digits", seed=-1)


@pytest.mark.integration  # starts a Python process
def test_data_imports_no_framework():
    code = textwrap.dedent("""
        import sys, duogard.data as d
        d.load("digits"); d.load("synthetic")
        print([m for m in ("jax", "torch") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- batching


def test_batches_cover_each_epoch_once(digits):
    per_epoch = digits.steps_per_epoch(32)
    assert per_epoch == digits.num_train // 32
    seen = np.concatenate([digits.batch_at(s, 32, seed=5)[1] for s in range(per_epoch)])
    order = digits.epoch_order(0, seed=5)
    assert sorted(order.tolist()) == list(range(digits.num_train))  # a permutation
    np.testing.assert_array_equal(seen, digits.y_train[order[: per_epoch * 32]])
    x, y = digits.batch_at(3, 32, seed=5)
    np.testing.assert_array_equal(x, digits.x_train[order[96:128]])
    assert x.shape == (32, 1, 8, 8) and x.flags.c_contiguous
    # the next epoch is a different order; another seed too
    assert not np.array_equal(digits.epoch_order(1, seed=5), order)
    assert not np.array_equal(digits.epoch_order(0, seed=6), order)


def test_resume_gives_the_same_batches(digits):
    straight = list(digits.batches(64, seed=3, steps=100))  # spans several epochs (22 per epoch)
    resumed = list(digits.batches(64, seed=3, start=50, steps=50))
    assert len(resumed) == 50
    for (xa, ya), (xb, yb) in zip(straight[50:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # random access agrees with the iterator, in any order
    for step in (99, 0, 67, 22):
        np.testing.assert_array_equal(digits.batch_at(step, 64, seed=3)[1], straight[step][1])


def test_drop_last_false_and_eval_batches(digits):
    n = digits.num_train
    assert digits.steps_per_epoch(500, drop_last=False) == -(-n // 500)
    sizes = [len(digits.batch_at(s, 500, drop_last=False)[1]) for s in range(3)]
    assert sizes == [500, 500, n - 1000]
    ys = np.concatenate([y for _, y in digits.eval_batches(100)])
    np.testing.assert_array_equal(ys, digits.y_test)
    assert [len(y) for _, y in digits.eval_batches(100)][-1] == digits.num_test % 100
    with pytest.raises(ValueError, match="batch_size=5000 exceeds the 1438 training examples"):
        digits.batch_at(0, 5000)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(digits.batches(0))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        next(digits.eval_batches(10, split="val"))


def test_batches_identical_on_both_backends(digits, both):
    x, y = digits.batch_at(7, 16, seed=1)
    for be in both:
        xb, yb = be.asarray(x), be.asarray(y)
        assert be.dtype_name(xb.dtype) == "float32"
        np.testing.assert_array_equal(be.to_numpy(xb).view(np.uint32), x.view(np.uint32))
        np.testing.assert_array_equal(be.to_numpy(yb), y)


# ----------------------------------------------------------------------------- IDX


def _write_set(directory, *, n_train=20, n_test=8, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for stem, a in arrays.items():
        data.write_idx(directory / (stem + (".gz" if gz else "")), a)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_set(tmp_path / "mnist", gz=gz)
    ds = data.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (8, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    expect = (arrays["train-images-idx3-ubyte"] / 255.0).astype(np.float32)[:, None]
    np.testing.assert_array_equal(ds.x_train, expect)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    if gz:  # gzip is detected from the content
        assert (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_digits_upsampled_to_28x28_as_mnist_idx_files(tmp_path, digits):
    """``write_digits_idx`` gives MNIST's four files from the digits (bilinear, as torch's
    ``interpolate(align_corners=False)``), with load("digits")'s split and labels."""
    assert data.write_digits_idx(tmp_path / "d28") == tmp_path / "d28"
    ds = data.load("mnist", data_dir=tmp_path / "d28")
    assert ds.x_train.shape == (len(digits.x_train), 1, 28, 28) and ds.x_test.shape[1:] == (1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, digits.y_train)
    np.testing.assert_array_equal(ds.y_test, digits.y_test)
    up = np.clip(np.rint(data.upsample(digits.x_train[:5, 0].astype(np.float64), 28) * 255), 0, 255) / 255
    np.testing.assert_allclose(ds.x_train[:5, 0], up, atol=1e-7)
    # a bilinear resize keeps a constant image constant and each image's mean, about
    flat = data.upsample(np.full((2, 8, 8), 0.5), 28)
    np.testing.assert_allclose(flat, 0.5, rtol=1e-12)
    assert abs(up.mean() - digits.x_train[:5].mean()) < 0.02
    # torch's bilinear interpolation, where it is installed
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 8, 8))
    ref = torch.nn.functional.interpolate(torch.tensor(x)[:, None], size=(28, 28), mode="bilinear")
    np.testing.assert_allclose(data.upsample(x, 28), ref[:, 0].numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="positive int size"):
        data.upsample(x, 0)


def test_fashion_mnist_directly_in_data_dir_and_dotted_names(tmp_path):
    arrays = _write_set(tmp_path, seed=1)
    (tmp_path / "train-images-idx3-ubyte").rename(tmp_path / "train-images.idx3-ubyte")
    ds = data.load("fashion_mnist", data_dir=tmp_path, flatten=True)
    assert ds.name == "fashion-mnist" and ds.x_train.shape == (20, 784)
    assert ds.class_names[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    with pytest.raises(ValueError, match="test_fraction must be None: fashion-mnist has an official"):
        data.load("fashion-mnist", data_dir=tmp_path, test_fraction=0.2)


def test_missing_idx_files_error_says_what_and_where(tmp_path):
    (tmp_path / "mnist").mkdir()
    data.write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", data_dir=tmp_path)
    msg = str(info.value)
    for name in data.IDX_FILES:
        assert name in msg
    assert str(tmp_path / "mnist") in msg and "missing: train-labels-idx1-ubyte" in msg
    assert "MNIST database" in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST repository"):
        data.load("fashion-mnist", data_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, dtype):
    a = (np.random.default_rng(0).standard_normal((3, 4, 5)) * 100).astype(dtype)
    for name in ("a.idx", "a.idx.gz"):
        back = data.read_idx(data.write_idx(tmp_path / name, a))
        assert back.dtype == a.dtype and back.shape == a.shape
        np.testing.assert_array_equal(back, a)


def test_idx_header_is_the_standard_one(tmp_path):
    path = data.write_idx(tmp_path / "l", np.array([1, 2, 3], np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])  # magic 2049, n=3


def test_idx_validation_errors(tmp_path):
    good = bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])
    cases = {
        "magic": (b"\x01" + good[1:], "not an IDX file"),
        "code": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "short": (good[:-1], "has 10 bytes but its header .* implies 11"),
        "long": (good + b"\x00", "has 12 bytes but its header .* implies 11"),
        "header": (good[:6], "truncated inside its header"),
        "gzip": (b"\x1f\x8b\x08garbage", "looks gzipped but does not decompress"),
    }
    for name, (raw, pattern) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=pattern) as info:
            data.read_idx(tmp_path / name)
        assert name in str(info.value)  # the message names the file


def test_idx_dataset_consistency_errors(tmp_path):
    _write_set(tmp_path)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))  # 8 images, 5 labels
    with pytest.raises(ValueError, match="has 8 images but .*t10k-labels-idx1-ubyte has 5 labels"):
        data.load("mnist", data_dir=tmp_path)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(8, 12, np.uint8))
    with pytest.raises(ValueError, match="has label 12; expected 0..9"):
        data.load("mnist", data_dir=tmp_path)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((8, 28, 28), np.float32))
    with pytest.raises(ValueError, match="must hold uint8 images"):
        data.load("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_teacher_labels():
    ds = data.load(
        "synthetic", seed=3, dtype="float64", num_examples=600, num_features=5, num_classes=3, hidden=7
    )
    assert ds.input_shape == (5,) and ds.num_classes == 3 and ds.num_train + ds.num_test == 600
    t = ds.info["teacher"]
    assert t["w1"].shape == (5, 7) and t["w2"].shape == (7, 3)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    logits = np.tanh(x @ t["w1"] + t["b1"]) @ t["w2"]
    np.testing.assert_array_equal(np.argmax(logits - logits.mean(0), axis=1), y)
    assert np.bincount(y, minlength=3).min() >= 60  # centred logits: no class starves
    again = data.load(
        "synthetic", seed=3, dtype="float64", num_examples=600, num_features=5, num_classes=3, hidden=7
    )
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert not np.array_equal(data.load("synthetic", seed=4).x_train, data.load("synthetic").x_train)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        data.load("synthetic", num_classes=1)


# ----------------------------------------------------------------------------- objectives


def _beale_grad(x, y):
    t1, t2, t3 = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return np.array(
        [
            2 * t1 * (y - 1) + 2 * t2 * (y**2 - 1) + 2 * t3 * (y**3 - 1),
            2 * t1 * x + 2 * t2 * 2 * x * y + 2 * t3 * 3 * x * y**2,
        ]
    )


def _rosenbrock_grad(x, y):
    return np.array([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)])


def test_objectives_registry():
    assert set(data.OBJECTIVES) == {"beale", "rosenbrock"}
    beale, rosen = data.objective("Beale"), data.OBJECTIVES["rosenbrock"]
    assert beale.minimum == (3.0, 0.5) and rosen.minimum == (1.0, 1.0)
    assert beale(np.array(beale.start)) == pytest.approx(14.203125)  # 1.5^2 + 2.25^2 + 2.625^2
    assert rosen(np.array(rosen.start)) == pytest.approx(24.2)  # 2.2^2 + 100 * 0.44^2
    with pytest.raises(ValueError, match="unknown objective 'himmelblau'.*'beale'"):
        data.objective("himmelblau")
    with pytest.raises(ValueError, match=r"beale: expected an array of shape \(2,\) .* got .*\(3,\)"):
        data.beale(np.zeros(3))
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 4), np.linspace(0, 2, 3)), axis=-1)
    assert data.rosenbrock(grid).shape == (3, 4)  # a (..., 2) grid for contour plots


@pytest.mark.parametrize("name, grad", [("beale", _beale_grad), ("rosenbrock", _rosenbrock_grad)])
def test_objective_values_and_gradients(be, name, grad):
    obj = data.OBJECTIVES[name]
    at_min = obj(be.asarray(np.array(obj.minimum), dtype="float64"))
    assert float(be.to_numpy(at_min)) == 0.0
    g_min = be.value_and_grad(obj.fn)(be.asarray(np.array(obj.minimum), dtype="float64"))[1]
    np.testing.assert_allclose(be.to_numpy(g_min), 0.0, atol=1e-12)
    for point in np.random.default_rng(0).uniform(-2, 2, (4, 2)):
        xy = be.asarray(point, dtype="float64")
        value, g = be.value_and_grad(obj.fn)(xy)
        np.testing.assert_allclose(float(be.to_numpy(value)), obj(point), rtol=1e-12)
        np.testing.assert_allclose(be.to_numpy(g), grad(*point), rtol=1e-10)
        # forward mode (what forward gradients use): JVP = grad . v
        v = np.array([0.3, -1.1])
        _, dot = be.jvp(obj.fn, (xy,), (be.asarray(v, dtype="float64"),))
        np.testing.assert_allclose(float(be.to_numpy(dot)), grad(*point) @ v, rtol=1e-10)
