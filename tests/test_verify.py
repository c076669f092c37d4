"""`gradflow verify`: every built-in check passes at K=1, and a false statement fails."""

import json

import numpy as np
import pytest

import gradflow as gf
from gradflow.cli import main
from gradflow.verify import CHECKS, Case, Check, checks, register, run_check

BUILT_IN = list(CHECKS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_check_passes(name):
    result = run_check(CHECKS[name], cases=1, seed=1)
    assert result.error is None, result.error
    assert result.passed, (result.worst, result.tolerance, result.worst_case)


def test_a_false_statement_fails():
    # Corollary 1's law on *unbalanced* inits is false: the same residual must fail there.
    law = CHECKS["cp-corollary1"]
    false = Check("corollary-without-balance", "Corollary 1 for ε > 0 (false)", "Gaussian init",
                  lambda key: checks._cp_case(key, lambda m: {"r": lambda t, m, o:
                                              gf.analysis.cp.corollary_residual(m, o)}),
                  law.residual, law.tolerance)
    result = run_check(false, cases=1)
    assert not result.passed and result.error is None and result.worst > 1e-3


def _draw(key):
    model = gf.CP.gaussian(key, (3, 3, 3), rank=3, std=0.3)
    objective = gf.Completion.from_tensor(gf.random_cp_tensor(key, (3, 3, 3), 2),
                                          gf.sample_indices(key, (3, 3, 3), 12))
    return Case(model, objective, dict(t1=50.0, observers=["loss"]), "3x3x3, R=3")


def test_registration_and_errors():
    check = Check("loss-decreases-test", "the loss never increases", "any", _draw,
                  lambda tr, case: float(max(0.0, np.max(np.diff(tr["loss"])))), 1e-12)
    try:
        register(check)
        with pytest.raises(ValueError, match="already registered"):
            register(check)
        assert run_check(check, cases=2).passed
    finally:
        CHECKS.pop("loss-decreases-test", None)
    with pytest.raises(TypeError, match="Check"):
        register("not a check")
    with pytest.raises(ValueError, match="cases"):
        run_check(check, cases=0)
    crashing = Check("crash", "s", "p", lambda key: 1 / 0, lambda tr, c: 0.0, 1.0)
    result = run_check(crashing, cases=1)
    assert not result.passed and "ZeroDivisionError" in result.error


def test_cli_user_check_file_json_and_exit_status(tmp_path, capsys):
    plugin = tmp_path / "mychecks.py"
    plugin.write_text(
        "import gradflow as gf\n"
        "from gradflow.verify import Case, Check, register\n"
        "def draw(key):\n"
        "    model = gf.CP.gaussian(key, (2, 2, 2), rank=2, std=0.3)\n"
        "    objective = gf.Completion.from_tensor(gf.random_cp_tensor(key, (2, 2, 2), 1),\n"
        "                                          gf.sample_indices(key, (2, 2, 2), 5))\n"
        "    return Case(model, objective, dict(t1=10.0), '2x2x2')\n"
        "register(Check('user-false', 'the loss is constant (false)', 'any', draw,\n"
        "               lambda tr, case: float(abs(tr['loss'][-1] - tr['loss'][0])), 1e-12))\n")
    out = tmp_path / "v.json"
    try:
        status = main(["verify", "--import", str(plugin), "--only", "user-false",
                       "--cases", "1", "--json", str(out)])
    finally:
        CHECKS.pop("user-false", None)
    assert status == 1
    printed = capsys.readouterr().out
    assert "user-false" in printed and "FAIL" in printed and "0/1 checks passed" in printed
    saved = json.loads(out.read_text())
    assert saved["results"][0]["name"] == "user-false" and not saved["results"][0]["passed"]
    with pytest.raises(SystemExit, match="unknown checks"):
        main(["verify", "--only", "no-such-check"])
