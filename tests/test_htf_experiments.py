"""The HTF experiments (`htf-incremental`, `compare-factorizations`) end to end, at tiny size,
and the sweeps of the HTF and deep-matrix experiments.

The balanced-init run and the two sweeps are long studies, marked `slow` (`pytest -m
slow` runs them): the balanced law itself is `gradflow verify`'s `htf-law` check (run by
tests/test_verify.py), and the sweep command's fit of the escape exponent is tested on a
CP problem in tests/test_sweep.py."""

import json

import numpy as np
import pytest

import gradflow as gf
from gradflow.cli import main

TINY_HTF = ["--dim", "3", "--truth-ranks", "2", "2", "--truth-norm", "9", "--observations",
            "60", "--widths", "6", "6", "--saves", "400", "--quiet"]
NODES = ["{0}", "{1}", "{2}", "{3}", "{0,1}", "{2,3}"]


def test_htf_incremental_learns_low_hierarchical_rank(tmp_path):  # §4.2–§4.5
    argv = ["run", "htf-incremental", "--stds", "0.1", "0.03", *TINY_HTF, "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experiment"] == "htf-incremental"
    assert summary["widths"] == {"{0,1}": 6, "{2,3}": 6, "{0,1,2,3}": 6}
    truth = {k: v["rank"] for k, v in summary["truth_hierarchical_ranks"].items()}
    assert truth == dict.fromkeys(NODES, 2)
    for std in ("0.1", "0.03"):
        r = summary["results"][std]
        assert r["status"] == "loss" and abs(r["final_loss"] / 2.5e-5 - 1) < 1e-6
        assert r["relative_reconstruction_error"] < 0.02
        ranks = {k: v["rank"] for k, v in r["hierarchical_ranks"].items()}
        assert all(ranks[k] <= 3 for k in NODES[:4])  # leaves: <= min(dim, width)
        assert all(ranks[k] <= 6 for k in NODES[4:])  # <= the widths
        assert r["rank_within_local_component_bound"]
        # every local component is recorded, not a re-sorted top-k
        assert r["local_components_recorded"] == {"{0,1}": 6, "{2,3}": 6, "{0,1,2,3}": 6}
        assert r["identity_residual_max"] < 1e-10  # §4.5's exact identity, any init
        assert r["corollary_residual_max"] > 1e-3  # the balanced law needs a balanced init
        assert r["t_escape"] > 0 and r["saves"] > 100
    small = summary["results"]["0.03"]
    # at the smaller init the solution has the truth's hierarchical rank, and only as
    # many root components as the truth's root width leave zero
    assert {k: v["rank"] for k, v in small["hierarchical_ranks"].items()} == truth
    assert small["local_components_above_1pct"]["{0,1,2,3}"] == 2
    assert small["t_escape"] > summary["results"]["0.1"]["t_escape"] * 10

    tr = gf.Trajectory.load(tmp_path / "trajectory_std0.03.npz")
    norms = np.asarray(tr["component_norms"])
    assert norms.shape == (small["saves"], 18) and np.all(np.isfinite(norms))
    assert np.all(np.diff(tr.ts) > 0) and tr.ts[-1] == tr.t_final
    assert tr.ts[0] == 0 and np.any(np.isclose(tr.ts, small["t_escape"], rtol=1e-12))
    # the learning phase after the plateau is finely saved
    assert np.sum(tr.ts > small["t_escape"]) > 100
    assert (tmp_path / "htf-incremental.png").stat().st_size > 10_000


@pytest.mark.slow  # a long study: `pytest -m slow`
def test_htf_incremental_balanced_init_follows_the_law_exactly(tmp_path):  # §4.5 corollary
    argv = ["run", "htf-incremental", "--init", "balanced", "--stds", "0.1", "--escape", "0",
            "--rtol", "1e-9", *TINY_HTF, "--out", str(tmp_path)]
    assert main(argv) == 0
    r = json.loads((tmp_path / "summary.json").read_text())["results"]["0.1"]
    assert r["status"] == "loss" and r["t_escape"] == 0
    assert r["unbalancedness_at_init"] < 1e-15
    assert r["corollary_residual_max"] < 1e-9 and r["identity_residual_max"] < 1e-10


def test_compare_factorizations_one_figure_three_models(tmp_path):
    argv = ["run", "compare-factorizations", "--matrix-dim", "8", "--dim", "3",
            "--truth-rank", "2", "--truth-norm", "8", "--observations", "48",
            "--cp-components", "10", "--htf-widths", "6", "6", "--htf-std", "0.1",
            "--escape", "0",
            "--saves", "300", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert list(results) == ["mf", "cp", "htf"]
    recorded = {"mf": 8, "cp": 10, "htf": 18}
    for name, r in results.items():
        assert r["status"] == "loss", name
        assert r["components_recorded"] == recorded[name]
        tr = gf.Trajectory.load(tmp_path / f"trajectory_{name}.npz")
        assert np.asarray(tr["component_norms"]).shape == (r["saves"], recorded[name])
    assert results["mf"]["rank"] == 2 and results["cp"]["rank"] == 2
    assert results["htf"]["rank"] == [2, 2]
    assert results["mf"]["shape"] == [8, 8] and results["htf"]["shape"] == [3, 3, 3, 3]
    assert (tmp_path / "compare-factorizations.png").stat().st_size > 10_000


def test_htf_incremental_config_from_python_and_its_defaults():
    from gradflow.experiments import htf_incremental as hi

    config = hi.Config()  # the paper's settings
    assert config.widths == (512, 512) and 0.01 in config.stds and config.solver == "default"
    assert config.observations == 2048 and config.truth_ranks == (5, 5)
    for bad, name in (({"widths": (8,)}, "widths"), ({"stds": (0.1, -1.0)}, "stds"),
                      ({"node": (0, 2)}, "node"), ({"rtol": 2.0}, "rtol"),
                      ({"observations": 10**6}, "observations")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            hi.Config(**bad)
    from gradflow.experiments import compare_factorizations as cf

    assert cf.Config().htf_widths == (512, 512) and cf.Config().htf_solver == "default"
    with pytest.raises(ValueError, match="`htf_widths`"):
        cf.Config(htf_widths=(4, 4, 4))


def test_htf_incremental_bad_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "htf-incremental", "--widths", "8", "--out", "/nonexistent/never"])
    assert exit_.value.code == 2 and "`--widths` must be 2 ints" in capsys.readouterr().err


@pytest.mark.slow  # a long study: `pytest -m slow`
def test_htf_sweep_fits_the_escape_exponent(tmp_path):
    # every weight scaled by α: the end tensor is a degree-7 polynomial in the weights of
    # the order-4 binary tree, so the plateau grows like α^-5
    argv = ["sweep", "htf-incremental", *TINY_HTF[:-1], "--scales", "0.1,0.05",
            "--seeds", "1", "--rtol", "1e-6", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["expected_slope"] == -5
    assert [r["ok"] for r in summary["per_scale"]] == [1, 1]
    assert -6.5 < summary["escape_time_slope"] < -3.5


@pytest.mark.slow  # a long study: `pytest -m slow`
def test_mf_sweep_fits_the_escape_exponent(tmp_path):
    # depth 3: the end matrix is cubic in the weights, the plateau grows like α^-1
    argv = ["sweep", "mf-incremental", "--dim", "6", "--truth-rank", "2", "--observations",
            "24", "--depths", "3", "--loss-drop", "1e-4", "--t1", "1e8", "--rtol", "1e-7",
            "--scales", "0.1,0.03", "--seeds", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["expected_slope"] == -1
    assert [r["ok"] for r in summary["per_scale"]] == [1, 1]
    assert -1.6 < summary["escape_time_slope"] < -0.6
    with pytest.raises(SystemExit) as exit_:  # depth 2 has no power law to fit
        main([*argv[:9], "2", *argv[10:]])
    assert exit_.value.code == 2


@pytest.mark.parametrize("name", ["htf_incremental", "mf_incremental"])
def test_sweep_setups_scale_with_their_stated_degree(name):
    # what the (slow) sweep tests fit: the end tensor of a member is homogeneous in the
    # sweep's scale of the degree `order` the sweep's expected slope -(order - 2) uses
    import importlib

    module = importlib.import_module(f"gradflow.experiments.{name}")
    small = dict(dim=3, truth_ranks=(2, 2), observations=60, widths=(6, 6)) \
        if name == "htf_incremental" else dict(dim=6, truth_rank=2, observations=24, depths=(3,))
    setup = module.sweep_setup(module.Config(**small))
    assert setup["order"] == (7 if name == "htf_incremental" else 3)
    at = lambda scale: setup["problem"]({"scale": scale, "seed": 1})[0].full()
    np.testing.assert_allclose(at(0.2), 2.0 ** setup["order"] * at(0.1), rtol=1e-12)
