"""The main job's code path end to end, at a size that runs in seconds."""

import json

import pytest

from gradflow.cli import main
from gradflow.experiments import tf_incremental


def test_tf_incremental_writes_png_json_and_trajectories(tmp_path):
    argv = ["run", "tf-incremental", "--stds", "0.05", "--order", "3", "--dim", "4",
            "--truth-rank", "2", "--observations", "40", "--components", "12",
            "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    result = summary["results"]["0.05"]
    assert result["status"] == "loss"
    assert result["final_loss"] > 0 and result["steps"] > 0
    assert (tmp_path / "tf-incremental.png").stat().st_size > 10_000
    assert (tmp_path / "trajectory_std0.05.npz").exists()


def test_tf_incremental_runs_from_python_without_argparse(tmp_path):
    # a theory script: a Config and run(), no flags; `out` (and its parents) is created
    # when the run writes
    config = tf_incremental.Config(stds=(0.05,), order=3, dim=3, truth_rank=1,
                                   observations=20, components=4)
    out = tmp_path / "nested" / "run"
    summary = tf_incremental.run(config, out)
    assert summary["experiment"] == "tf-incremental" and summary["components"] == 4
    assert summary["config"] == {f: getattr(config, f) for f in summary["config"]}
    assert summary["results"]["0.05"]["status"] == "loss"
    written = json.loads((out / "summary.json").read_text())
    assert written["results"] == summary["results"] and written["config"]["out"] == str(out)
    assert (out / "trajectory_std0.05.npz").exists() and (out / "tf-incremental.png").exists()


@pytest.mark.parametrize("argv, flag", [
    (["tf-incremental", "--rtol", "-1"], "`--rtol`"),
    (["tf-incremental", "--components", "0"], "`--components`"),
    (["tf-incremental", "--observations", "100000"], "`--observations`"),
    (["tf-incremental", "--order", "1"], "`--order`"),
    (["tf-incremental", "--loss", "huber"], "`--delta`"),
    (["tf-incremental", "--loss", "huber", "--delta", "-1"], "`--delta`"),
    (["mf-incremental", "--rtol", "0"], "`--rtol`"),
    (["rc-norms", "--rtol", "nan"], "`--rtol`"),
])
def test_bad_flags_exit_2_naming_the_flag_and_write_nothing(argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", *argv, "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


def test_rc_norms_bounds_hold_and_norms_grow(tmp_path):  # §2.3, §2.4 along whole trajectories
    argv = ["run", "rc-norms", "--depths", "3", "--eps", "0", "0.5", "--loss-tol", "1e-5",
            "--rtol", "1e-9", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    depth3 = results["unperturbed"]["depth3"]
    assert depth3["status"] == "loss" and depth3["det_sign_kept_to_end"]
    assert depth3["bounds"]["holds"] and depth3["bounds"]["saves_checked"] > 100
    # |w11| ~ 1/s: the bound (1-s)^2/s is asymptotically tight (docs: theory/razin-cohen)
    assert abs(depth3["abs_w11_times_s_at_that_loss"] - 1) < 0.01
    assert depth3["final_abs_w11"] > 100 and depth3["final_rank_subopt"] < 1e-6
    for eps in ("eps0", "eps0.5"):
        assert results["perturbed"][eps]["bounds"]["holds"]
    # eps = 0.5: the flow settles near the rank-one solution |w11| = |z z'/eps| = 2
    assert abs(results["perturbed"]["eps0.5"]["final_abs_w11"] - 2) < 0.1
    assert (tmp_path / "rc-norms.png").stat().st_size > 10_000


def test_mf_incremental_depth_lowers_rank(tmp_path):  # §1.5–1.6 at small size
    argv = ["run", "mf-incremental", "--depths", "1", "3", "--scales", "1e-3", "--dim", "20",
            "--truth-rank", "3", "--observations", "200", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    shallow, deep = results["depth1_scale0.001"], results["depth3_scale0.001"]
    assert shallow["status"] == deep["status"] == "loss"
    assert deep["effective_rank"] < 3.5 < shallow["effective_rank"]
    assert deep["relative_reconstruction_error"] < 0.1 < shallow["relative_reconstruction_error"]
    order = deep["learning_order"]  # largest singular value learned first, then the next
    assert order[0] < order[1] < order[2]
    assert (tmp_path / "mf-incremental.png").stat().st_size > 10_000


def test_the_cli_keeps_compiled_programs_in_a_per_user_cache(tmp_path):
    import os
    import subprocess
    import sys

    # one fresh interpreter (this one must not turn the cache on): off, then on
    code = ("import os, jax, jax.numpy as jnp\nfrom gradflow import cli\n"
            "for off in ('1', '0'):\n"
            "    os.environ['GRADFLOW_NO_CACHE'] = off\n"
            "    cli._use_cache(True)\n"
            "    print(jax.jit(lambda v: (v * 2.0).sum())(jnp.ones(3)))\n"
            "    print(jax.config.jax_compilation_cache_dir)\n")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["6.0", "None", "6.0", str(tmp_path / "gradflow" / "jax")]
