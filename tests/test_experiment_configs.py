"""Every experiment takes a typed `Config` (the papers' defaults, every field checked), and
the command line is a thin layer over it: a bad flag is an argparse error naming the flag
(exit status 2), before any output folder is created."""

import argparse
import dataclasses
import inspect

import pytest

from gradflow.cli import main
from gradflow.experiments import EXPERIMENTS, _config
from gradflow.experiments import tensor_completion, tf_incremental

# Per experiment: some of the papers' defaults, and bad values (field -> value) each
# refused with a ValueError naming the field.
DEFAULTS = {
    "tf-incremental": dict(stds=(0.05, 0.01, 0.005), order=4, dim=10, truth_rank=5,
                           observations=2000, components=None, loss_drop=1e-4, rtol=1e-8,
                           loss="squared", delta=None, task="completion"),
    "mf-incremental": dict(depths=(1, 2, 3, 4), scales=(1e-1, 1e-2, 1e-3), dim=100,
                           truth_rank=5, observations=2000, loss_drop=1e-6, rtol=1e-8,
                           init="gaussian", nuclear_norm=True),
    "rc-norms": dict(depths=(2, 3, 4), init="identity", scale=1e-1, perturbed_depth=3,
                     eps=(0.0, 0.01, 0.05, 0.1, 0.5), z=(-2.0, 0.5), loss_tol=1e-8,
                     rtol=1e-10),
    "htf-incremental": dict(widths=(512, 512), truth_ranks=(5, 5), observations=2048,
                            stds=(0.03, 0.01, 0.003), loss_tol=2.5e-5),
    "compare-factorizations": dict(models=("mf", "cp", "htf"), cp_components=512,
                                   htf_widths=(512, 512), observations=2048),
    "gd-vs-flow": dict(lrs=(0.8, 0.4, 0.2, 0.1, 0.05, 0.025), saves=100, cp_dim=5,
                       cp_components=6, dmf_depth=3, rtol=1e-11),
    "rank-one-trajectory": dict(alphas=(3e-2, 1e-2, 3e-3, 1e-3), order=3, dim=3,
                                components=4, observations=12, delta_fraction=0.05, T=40.0,
                                D=None, solver="dopri8", rtol=1e-13),
    "tensor-rank-complexity": dict(data="digits", idx_dir=None, max_rank=8, classes=None,
                                   steps=3000, lr=None, dtype="float32"),
    "tensor-completion": dict(order=3, dim=8, truth_ranks=(1, 3), stds=(1e-2, 1e-3),
                              components=None, rank_tol=1e-3),
    "diagonal-bias": dict(dim=200, observations=50, sparsity=5, depth=2, rtol=1e-10),
}
BAD = {
    "tf-incremental": dict(rtol=-1.0, components=0, observations=100_000, order=1,
                           stds=(0.1, float("nan")), t1=float("inf")),
    "mf-incremental": dict(rtol=0.0, truth_rank=101, depths=(0,), scales=(1e-2, -1.0),
                           observations=10_001),
    "rc-norms": dict(rtol=float("nan"), depths=(1,), z=(1.0, 0.0), eps=(0.1, 0.1),
                     scale=0.0),
    "htf-incremental": dict(widths=(8,), rtol=2.0, node=(0, 2), observations=10**6),
    "compare-factorizations": dict(htf_widths=(4, 4, 4), mf_std=0.0, models=("mf", "mf")),
    "gd-vs-flow": dict(lrs=(0.1,), saves=0, cp_observations=200, dmf_t1=-1.0),
    "rank-one-trajectory": dict(order=2, delta_fraction=1.0, shrink=1.5, D=-1.0,
                                alphas=(0.1, 0.1)),
    "tensor-rank-complexity": dict(max_rank=0, classes=(1, 1), test_fraction=1.0,
                                   lr=-1.0, idx_dir="/no/such/folder"),
    "tensor-completion": dict(observations=(600,), stds=(0.0,), rtol=1e-17, seeds=0),
    "diagonal-bias": dict(observations=300, depth=1, alphas=(1.0, 1.0), rtol=1.0),
}
# Per experiment: a bad flag, and the flag the error must name.
BAD_FLAGS = {
    "tf-incremental": (["--components", "0"], "`--components`"),
    "mf-incremental": (["--rtol", "0"], "`--rtol`"),
    "rc-norms": (["--rtol", "nan"], "`--rtol`"),
    "htf-incremental": (["--widths", "8"], "`--widths`"),
    "compare-factorizations": (["--mf-std", "0"], "`--mf-std`"),
    "gd-vs-flow": (["--saves", "0"], "`--saves`"),
    "rank-one-trajectory": (["--order", "2"], "`--order`"),
    "tensor-rank-complexity": (["--max-rank", "0"], "`--max-rank`"),
    "tensor-completion": (["--truth-ranks", "0"], "`--truth-ranks`"),
    "diagonal-bias": (["--observations", "300"], "`--observations`"),
}


def test_every_experiment_is_covered():
    assert set(DEFAULTS) == set(BAD) == set(BAD_FLAGS) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_config_from_python_has_the_papers_defaults(name):
    module = EXPERIMENTS[name]
    config = module.Config()  # no argparse
    assert dataclasses.is_dataclass(config)
    for field, value in DEFAULTS[name].items():
        assert getattr(config, field) == value, field
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    # the pattern: run(config, out=None, progress=False)
    params = list(inspect.signature(module.run).parameters.values())
    assert [p.name for p in params] == ["config", "out", "progress"]
    assert params[1].default is None and params[2].default is False


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_flags_are_the_config_and_its_defaults(name):
    # one flag per field; parsing no flags gives the Config's defaults
    config_cls = EXPERIMENTS[name].Config
    parser = argparse.ArgumentParser()
    _config.add_arguments(parser, config_cls)
    assert _config.from_args(config_cls, parser.parse_args([]), parser) == config_cls()
    for field in dataclasses.fields(config_cls):
        assert field.metadata.get(_config.HELP), f"{name}: `{field.name}` has no help"


@pytest.mark.parametrize("name, field, value",
                         [(n, f, v) for n in sorted(BAD) for f, v in BAD[n].items()])
def test_config_refuses_a_bad_value_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        EXPERIMENTS[name].Config(**{field: value})
    assert isinstance(error.value, _config.SettingError)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_a_bad_flag_is_an_argparse_error_before_any_output(name, tmp_path, capsys):
    argv, flag = BAD_FLAGS[name]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", name, *argv, "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "must be" in err and "Traceback" not in err
    assert not out.exists()


def test_tf_incremental_components_default_to_the_maximal_cp_rank():
    assert tf_incremental.Config().num_components == 1000  # the main job's 10^4
    small = dict(order=3, observations=400)
    assert tf_incremental.Config(**small).num_components == 100
    assert tf_incremental.Config(**small, components=12).num_components == 12
    assert tensor_completion.Config().num_components == 64


@pytest.mark.parametrize("argv, flag", [
    # checks that need the data run before anything is written
    (["tensor-rank-complexity", "--classes", "42", "--max-rank", "1"], "`--classes`"),
    (["rank-one-trajectory", "--D", "1e-9"], "`--D`"),
    (["tensor-rank-complexity", "--idx-dir", "."], "`--idx-dir`"),
])
def test_checks_made_by_run_are_argparse_errors_too(argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["run", *argv, "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["mf-incremental", "--seeds", "0"], "--seeds"),
    (["mf-incremental", "--depths", "2"], "`--depths`"),
    (["tf-incremental", "--rtol", "-1"], "`--rtol`"),
    (["tf-incremental", "--scales", "0:1:3"], "`--scales`"),
    (["htf-incremental", "--chunk-size", "0"], "--chunk-size"),
])
def test_sweep_flags_are_checked_before_any_output(argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *argv, "--out", str(out), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "grid[" not in err
    assert not out.exists()
