"""`wise-ft demo --quick` end to end: a real SFT run, callback, merge, table, files."""

import json
import os
import subprocess
import sys

import pytest

from wise_callback.report import read_history


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "wise_callback.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "early snapshot" in run.stdout and "WiSE-FT a=0.50" in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    history = read_history(out)
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    settings = summary["settings"]
    steps = sorted({r["step"] for r in history})
    assert steps == [settings["snapshot_at"], 250, settings["sft_steps"]]
    assert history[0]["alpha"] == 0.0 and history[0]["step"] == settings["snapshot_at"]
    final = {r["alpha"]: r for r in history if r["step"] == settings["sft_steps"]}
    assert sorted(final) == [0.5, 1.0]
    assert summary["chosen_alpha"] in final
    assert isinstance(summary["collapse_warning"], bool)
    for record in history:
        assert record["num_problems"] == settings["num_heldout"]
        passes = [record[f"pass@{k}"] for k in (1, 2, 4, 8, 16)]
        assert all(0.0 <= p <= 1.0 for p in passes)
        assert passes == sorted(passes)  # Pass@k never falls with k
        assert record["pass@1"] == pytest.approx(record["mean_rho"])
        assert sum(record["rho_hist"]) == record["num_problems"]
    # the base model already has part of the skill, and SFT makes Pass@1 rise
    assert 0.1 < summary["pass@1_early"] < summary["pass@1_end"]
    chosen = final[summary["chosen_alpha"]]
    assert summary["pass@16_wiseft"] == chosen["pass@16"] >= final[1.0]["pass@16"]
