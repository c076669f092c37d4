"""The main job's code path end to end, at a size that runs in seconds."""

import json

from gradflow.cli import main


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
