"""The `gd-vs-flow` experiment end to end through the command line, at small size."""

import json

import numpy as np
import pytest

from gradflow.cli import main
from gradflow.experiments import gd_vs_flow


def test_gd_vs_flow_cli(tmp_path):
    out = tmp_path / "gd"
    argv = ["run", "gd-vs-flow", "--out", str(out), "--quiet",
            "--lrs", "0.4", "0.2", "0.1", "--saves", "20",
            "--cp-t1", "40", "--dmf-t1", "16"]
    assert main(argv) == 0
    assert (out / "gd-vs-flow.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "gd-vs-flow"
    for key in ("cp", "dmf"):
        result = summary["results"][key]
        assert result["flow_status"] == "t1"
        assert result["learning_rates"] == [0.4, 0.2, 0.1]
        errors = np.array(result["max_relative_error"])
        assert np.all(np.diff(errors) < 0) and errors[-1] < 0.05, errors
        # GD is first order: the error halves with η (to O(η) in the fitted slope)
        assert result["slope"] == pytest.approx(1.0, abs=0.05), result
        assert result["gd_steps"] == {"cp": [100, 200, 400], "dmf": [40, 80, 160]}[key]


def test_gd_vs_flow_rejects_unmatched_times(tmp_path, capsys):
    # every learning rate must hit the comparison times exactly: refused by the Config,
    # and on the command line an argparse error naming the flags, before any output
    with pytest.raises(ValueError, match="must be a positive integer"):
        gd_vs_flow.Config(lrs=(0.3, 0.2), saves=20, cp_t1=40.0)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        main(["run", "gd-vs-flow", "--out", str(out), "--quiet",
              "--lrs", "0.3", "0.2", "--saves", "20", "--cp-t1", "40"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "must be a positive integer" in err and "`--cp-t1`" in err and "`--lrs`" in err
    assert not out.exists()
