"""Tensor rank as a measure of complexity (TF paper §5.2): data, the log-domain CP predictor
(`gf.StackedCP`), the grouped fits (`gf.GroupedFits`), the run."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow import datasets
from gradflow.cli import main
from gradflow import GroupedFits, StackedCP
from gradflow.experiments.tensor_rank_complexity import NAME, layout
from gradflow.models import component_values


# --- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        array = array + 7
    path = datasets.write_idx(tmp_path / name, array)
    back = datasets.read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_idx_reader_matches_the_published_layout(tmp_path):
    # header of MNIST's train-images file: magic 0x00000803, then 60000, 28, 28 (big-endian)
    header = bytes.fromhex("00000803") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
    (tmp_path / "x").write_bytes(header + bytes(range(8)))
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "x"),
                                  np.arange(8, dtype=np.uint8).reshape(2, 2, 2))


def test_idx_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        datasets.read_idx(tmp_path / "missing")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        datasets.read_idx(tmp_path / "code")
    good = datasets.write_idx(tmp_path / "short", np.zeros((3, 4), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*holds 11"):
        datasets.read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="cannot store dtype int64"):
        datasets.write_idx(tmp_path / "y", np.zeros(3, np.int64))


def fake_mnist(folder, m_train=6, m_test=4, gz=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, m in (("train", m_train), ("t10k", m_test)):
        datasets.write_idx(folder / f"{split}-images-idx3-ubyte{suffix}",
                           rng.integers(0, 256, (m, 28, 28), dtype=np.uint8))
        datasets.write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}",
                           rng.integers(0, 10, m).astype(np.uint8))


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_folder(tmp_path, gz):
    fake_mnist(tmp_path, gz=gz)
    data = datasets.load_idx(tmp_path, name="fake")
    assert data.name == "fake" and data.max_value == 255.0
    assert data.train_images.shape == (6, 28, 28) and data.test_labels.shape == (4,)
    assert data.train_labels.dtype == np.int64
    small = data.subset(max_train=3, seed=1)
    assert small.train_images.shape == (3, 28, 28) and small.test_images.shape == (4, 28, 28)


def test_load_idx_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX folder not found"):
        datasets.load_idx(tmp_path / "nope")
    fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="no t10k-labels-idx1-ubyte file.*looked for"):
        datasets.load_idx(tmp_path)
    datasets.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="4 test images but 5 test labels"):
        datasets.load_idx(tmp_path)


def test_digits_and_binarize():
    data = datasets.load_digits(test_fraction=0.3, seed=0)
    assert data.image_shape == (8, 8) and data.max_value == 16
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert len(data.test_labels) == round(0.3 * 1797)
    assert set(data.classes) == set(range(10))
    # round(pixel / max), ties to even: exactly one half maps to 0
    np.testing.assert_array_equal(datasets.binarize(np.array([0, 7, 8, 9, 16]), 16),
                                  [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(datasets.binarize(np.array([127, 128]), 255), [0, 1])


# --- the CP predictor in log domain -----------------------------------------------------------


def test_component_values_equal_the_cp_entries_and_their_gradients():
    order = 12
    keys = jr.split(jr.key(0), order + 1)
    model = gf.CP(tuple(1 + 0.5 * jr.normal(k, (2, 5)) for k in keys[:order]))  # some < 0
    x = jr.bernoulli(keys[order], 0.3, (50, order)).astype(jnp.int32)
    assert any(bool(jnp.any(f < 0)) for f in model.factors)
    target = jnp.linspace(-1, 1, 50)

    @eqx.filter_jit
    def both(m):
        ours = lambda m: component_values(m, x).sum(axis=1)
        loss = lambda m, f: jnp.sum((f(m) - target) ** 2)
        return ours(m), m.entries(x), jax.grad(loss)(m, ours), jax.grad(loss)(m, lambda m: m.entries(x))

    values, entries, g_log, g_ref = both(model)
    np.testing.assert_allclose(values, entries, rtol=1e-12)
    for a, b in zip(g_log.factors, g_ref.factors):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # the one-array model is the same tensor
    stacked = StackedCP.from_cp(model)
    assert stacked.shape == model.shape and stacked.rank == 5
    np.testing.assert_allclose(eqx.filter_jit(stacked.entries)(x), entries, rtol=1e-12)
    np.testing.assert_allclose(stacked.component_norms(), model.component_norms(), rtol=1e-12)
    np.testing.assert_array_equal(stacked.as_cp().factors[3], model.factors[3])
    np.testing.assert_allclose(eqx.filter_jit(stacked.component_values)(x),
                               eqx.filter_jit(component_values)(model, x), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_log_domain_survives_products_that_overflow_midway(dtype):
    # order 80: the first 40 factors are 1e10, the last 40 are 1e-10, product exactly 1.
    # Multiplying in mode order overflows (1e400 > float64 max) on the way.
    order = 80
    model = gf.CP(tuple(jnp.full((2, 1), 1e10 if n < 40 else 1e-10, dtype) for n in range(order)))
    x = jnp.zeros((1, order), jnp.int32)
    values = eqx.filter_jit(component_values)
    assert not np.isfinite(np.asarray(eqx.filter_jit(lambda m: m.entries(x))(model))).all()
    np.testing.assert_allclose(values(model, x), [[1.0]], rtol=1e-3)
    # a zero factor gives a zero value and a finite gradient
    zero = gf.CP((jnp.zeros((2, 1), dtype),) + model.factors[1:])
    assert float(values(zero, x)[0, 0]) == 0
    grad = eqx.filter_jit(jax.grad(lambda m: component_values(m, x).sum()))(zero)
    assert all(np.isfinite(np.asarray(g)).all() for g in grad.factors)


def test_grouped_fits_give_each_fit_exactly_its_own_gradient():
    # two blocks (own inputs), tasks x ranks groups: the summed objective's gradient on
    # each fit's components equals that of the fit alone
    rng = np.random.default_rng(0)
    n, ranks, tasks = 6, [1, 2], 2
    groups = layout(tasks, ranks)
    rb = groups.shape[0]
    x = rng.integers(0, 2, (2, 30, n)).astype(np.int32)
    y = rng.random((2, 30, groups.shape[1]))
    model = StackedCP(1 + 0.2 * jr.normal(jr.key(1), (n, 2, 2 * rb)))
    grad = eqx.filter_jit(lambda m, o: jax.grad(o)(m))
    joint = grad(model, GroupedFits((2,) * n, x, y, groups))
    for b in range(2):
        for g in range(groups.shape[1]):
            comps = np.flatnonzero(groups[:, g])
            alone = GroupedFits((2,) * n, x[b:b + 1], y[b:b + 1, :, g:g + 1],
                                np.ones((len(comps), 1)))
            single = grad(model.take(jnp.asarray(b * rb + comps)), alone)
            np.testing.assert_allclose(joint.weights[:, :, b * rb + comps], single.weights,
                                       rtol=1e-12, atol=1e-15)


# --- the experiment ---------------------------------------------------------------------------


def test_original_digits_fit_far_better_than_shuffled_labels(tmp_path):
    argv = ["run", NAME, "--classes", "0", "1", "--max-rank", "2", "--steps", "600",
            "--max-train", "300", "--max-test", "200", "--out", str(tmp_path), "--quiet"]
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert summary["order"] == 64 and summary["train_size"] == 300
    assert summary["status"] == "t1"
    res = summary["results"]
    original = res["original"]
    for control in ("rand label", "rand image"):
        for split in ("train", "test"):
            ours, theirs = original[f"{split}_mse_mean"], res[control][f"{split}_mse_mean"]
            assert all(a < 0.5 * b for a, b in zip(ours, theirs)), (control, split, ours, theirs)
    # rank one already fits the digits far below the trivial error (the label variance)
    assert original["train_mse_mean"][0] < 0.25 * original["label_variance"]
    assert (tmp_path / f"{NAME}.png").stat().st_size > 10_000
    with np.load(tmp_path / "mse.npz") as data:
        assert data["train"].shape == (3, 2, 2)
