"""The tensor-completion experiment at a tiny size, and the new flags of tf-incremental,
mf-incremental and tensor-rank-complexity."""

import json

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow.cli import main
from gradflow.experiments import mf_incremental, tensor_completion, tensor_rank_complexity
from gradflow.experiments import tf_incremental


# --- tensor-completion -----------------------------------------------------------------------


def completion_argv(out):
    return ["run", "tensor-completion", "--dim", "3", "--truth-ranks", "1", "2",
            "--observations", "8", "27", "--stds", "1e-2", "--seeds", "1", "--max-rank", "3",
            "--solver", "tsit5", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def completion_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tc")
    assert main(completion_argv(out)) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_tensor_completion_writes_its_figure_and_table(completion_run):
    out, summary = completion_run
    assert (out / "tensor-completion.png").stat().st_size > 20_000
    assert summary["components"] == 9  # the maximal CP rank of 3x3x3
    assert len(summary["members"]) == 4 and len(summary["linear_baseline"]) == 4
    assert all(m["status"] == "loss" for m in summary["members"])
    table = summary["table"]
    assert table["rank1"]["observations"] == [8, 27]
    assert set(table["rank2"]) == {"std0.01", "linear", "observations"}


def test_tensor_completion_resumes_from_its_sweep_folder(completion_run, capsys):
    # the flows are written chunk by chunk to out/sweep: a second run (as after an
    # interruption) reads them back instead of solving again
    out, summary = completion_run
    chunks = sorted((out / "sweep").glob("chunk_*.npz"))
    assert chunks and (out / "sweep" / "config.json").exists()
    stamps = [c.stat().st_mtime_ns for c in chunks]
    assert main(completion_argv(out)) == 0
    assert [c.stat().st_mtime_ns for c in chunks] == stamps
    again = json.loads((out / "summary.json").read_text())
    assert again["members"] == summary["members"]
    # flows of another problem are refused, naming the flag
    with pytest.raises(SystemExit) as exit_:
        main([*completion_argv(out), "--seed", "1"])
    assert exit_.value.code == 2 and "`--out`" in capsys.readouterr().err


def test_tensor_completion_against_oracles(completion_run):
    _, summary = completion_run
    config = tensor_completion.Config(dim=3, truth_ranks=(1, 2), observations=(8, 27),
                                      stds=(1e-2,), seeds=1, max_rank=3)
    k_truth, k_obs, _ = tensor_completion.member_keys(config, 0)
    order = np.asarray(tensor_completion.entry_order(k_obs, config.dims, 27))
    assert len({tuple(r) for r in order.tolist()}) == 27  # a permutation of all entries
    for row in summary["linear_baseline"]:
        truth = np.asarray(tensor_completion.target(k_truth, config.dims, row["truth_rank"], 2))
        np.testing.assert_allclose(np.linalg.norm(truth), 1.0, rtol=1e-12)
        seen = truth[tuple(order[:row["observations"]].T)]
        # the baseline's error is the norm of what it did not observe
        np.testing.assert_allclose(row["relative_error"], np.sqrt(max(1 - np.sum(seen**2), 0.0)),
                                   rtol=1e-9, atol=1e-12)
        if row["observations"] == 27:  # everything observed: the baseline is the target
            assert row["relative_error"] < 1e-12 and row["als_rank"] == row["truth_rank"]
    full = {(m["truth_rank"], m["observations"]): m for m in summary["members"]}
    for rank in (1, 2):
        # every entry observed: the flow completes the target, and its solution has
        # the target's rank (the other components of init 1e-2 stay ~1e-6 or vanish)
        assert full[rank, 27]["relative_error"] < 1e-3
        assert full[rank, 27]["als_rank"] == rank
        assert full[rank, 27]["components_above_1pct"] == rank


def test_tensor_completion_config_is_checked():
    with pytest.raises(ValueError, match="`observations`"):
        tensor_completion.Config(dim=3, observations=(28,))
    with pytest.raises(ValueError, match="`stds`"):
        tensor_completion.Config(stds=(0.0,))
    with pytest.raises(SystemExit):  # argparse names the flag
        main(["run", "tensor-completion", "--truth-ranks", "0", "--quiet"])
    assert tensor_completion.Config(order=4).num_components == 512


def test_masked_problem_is_the_subset_problem():
    config = tensor_completion.Config(dim=3, observations=(5, 27), truth_ranks=(2,))
    build = tensor_completion.problem(config)
    params = {"truth_rank": jnp.asarray(2), "observations": jnp.asarray(5),
              "scale": jnp.asarray(0.3), "seed": jnp.asarray(0)}
    model, objective = build(params)
    assert model.rank == 9 and objective.num_observations == 27
    subset = gf.Completion(objective.shape, objective.indices[:5], objective.values[:5])
    np.testing.assert_allclose(float(objective(model)), float(subset(model)), rtol=1e-14)


# --- tf-incremental: --loss, --delta, --task ---------------------------------------------------


def test_tf_incremental_objectives():
    small = dict(order=3, dim=4, truth_rank=2, observations=30)
    config = lambda **kw: tf_incremental.Config(**small, **kw)
    truth, huber, _ = tf_incremental.problem_data(config(loss="huber", delta=0.01))
    assert isinstance(huber, gf.Completion) and float(huber.loss.delta) == 0.01
    _, l1, _ = tf_incremental.problem_data(config(loss="absolute"))
    assert isinstance(l1.loss, gf.AbsoluteLoss)
    _, sensing, _ = tf_incremental.problem_data(config(task="sensing"))
    assert isinstance(sensing, gf.Sensing) and sensing.operators.shape == (30, 4, 4, 4)
    np.testing.assert_allclose(sensing.values, jnp.tensordot(sensing.operators, truth, axes=3),
                               rtol=1e-12)
    _, squared, _ = tf_incremental.problem_data(config())  # the default is unchanged
    assert isinstance(squared.loss, gf.SquaredLoss) and isinstance(squared, gf.Completion)
    # Huber needs its delta, and a delta needs Huber: refused when the Config is built
    with pytest.raises(ValueError, match="`delta`"):
        config(loss="huber")
    with pytest.raises(ValueError, match="`delta`.*`loss` 'huber'"):
        config(delta=0.1)
    with pytest.raises(ValueError, match="`delta` must be a finite number > 0"):
        config(loss="huber", delta=-1.0)


@pytest.mark.parametrize("argv, flag", [
    (["--loss", "huber"], "`--delta`"),
    (["--loss", "huber", "--delta", "-1"], "`--delta` must be a finite number > 0"),
    (["--delta", "0.1"], "`--loss` 'huber'"),
])
def test_tf_incremental_huber_flags_are_argparse_errors(tmp_path, capsys, argv, flag):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "tf-incremental", *argv, "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


def test_tf_incremental_huber_sensing_run(tmp_path):
    argv = ["run", "tf-incremental", "--stds", "0.05", "--order", "3", "--dim", "4",
            "--truth-rank", "1", "--observations", "40", "--components", "6",
            "--task", "sensing", "--loss", "huber", "--delta", "0.002",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    result = summary["results"]["0.05"]
    assert summary["config"]["task"] == "sensing" and summary["config"]["loss"] == "huber"
    assert result["status"] == "loss" and result["components_above_1pct"] >= 1
    # 40 Gaussian measurements of a rank-1 4x4x4 tensor (10 degrees of freedom) determine it
    assert result["relative_reconstruction_error"] < 0.05
    assert (tmp_path / "tf-incremental.png").stat().st_size > 10_000


# --- mf-incremental: the nuclear-norm baseline and --init ---------------------------------------


def test_mf_nuclear_norm_baseline_and_inits():
    truth = mf_incremental.ground_truth(jr.key(0), 16, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(1), (16, 16), 200))
    baseline = mf_incremental.nuclear_norm_baseline(objective, truth)
    assert baseline["converged"] and baseline["relative_reconstruction_error"] < 1e-5
    assert baseline["rank"] == 2 and 1 < baseline["effective_rank"] < 2
    assert abs(baseline["duality_gap"]) < 1e-5 * baseline["nuclear_norm"]
    dims = (16, 16, 16)
    for init in mf_incremental.INITS[1:]:
        model = mf_incremental.initial_model(jr.key(2), dims, 1e-2, init)
        np.testing.assert_allclose(np.linalg.norm(model.full()), 1e-2, rtol=1e-12)
    gaussian = mf_incremental.initial_model(jr.key(2), dims, 1e-2)
    expected = mf_incremental.layer_std(1e-2, dims) * jr.normal(jr.split(jr.key(2), 2)[0], (16, 16))
    np.testing.assert_array_equal(gaussian.layers[0], expected)  # unchanged


def test_mf_incremental_flags(tmp_path):
    argv = ["run", "mf-incremental", "--depths", "2", "--scales", "1e-2", "--dim", "8",
            "--truth-rank", "1", "--observations", "40", "--init", "orthogonal",
            "--no-nuclear-norm", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["min_nuclear_norm"] is None and summary["config"]["init"] == "orthogonal"
    assert summary["results"]["depth2_scale0.01"]["status"] == "loss"


# --- tensor-rank-complexity: the linear baseline -------------------------------------------------


def test_linear_baseline_against_least_squares():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (80, 6))
    w, b = rng.normal(size=(6, 2)), np.array([0.5, -1.0])
    exact = x @ w + b
    train, test = tensor_rank_complexity.linear_baseline(x[:60], exact[:60], x[60:],
                                                         exact[60:], 1.0)
    assert np.all(train < 1e-25) and np.all(test < 1e-25)  # a linear target is fit exactly
    y = rng.normal(size=(60, 2))
    train, test = tensor_rank_complexity.linear_baseline(x[:60], y, x[60:], y[:20] * 100, 1.0)
    design = np.concatenate([x[:60], np.ones((60, 1))], axis=1)
    coef = np.linalg.solve(design.T @ design, design.T @ y)  # the normal equations
    np.testing.assert_allclose(train, np.mean((design @ coef - y) ** 2, axis=0), rtol=1e-10)
    assert np.all(test <= 1.0)  # clipped


def test_tensor_rank_complexity_reports_the_linear_baseline(tmp_path):
    argv = ["run", "tensor-rank-complexity", "--classes", "0", "--max-rank", "1",
            "--steps", "20", "--max-train", "120", "--max-test", "60",
            "--out", str(tmp_path), "--quiet"]
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        assert main(argv) == 0
    results = json.loads((tmp_path / "summary.json").read_text())["results"]["results"]
    for variant in tensor_rank_complexity.VARIANTS:
        r = results[variant]
        assert 0 <= r["linear_train_mse_mean"] <= r["label_variance"] + 1e-12
    # with pixels as features, the digits are fit far better than shuffled labels
    assert (results["original"]["linear_train_mse_mean"]
            < 0.5 * results["rand label"]["linear_train_mse_mean"])
