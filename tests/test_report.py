"""The report turns history records into the table and figure users read."""

import json

import numpy as np
import pytest

from wise_callback.metrics import collapse_stats
from wise_callback.report import format_table, plot_history, read_history, table_rows


def record(step, alpha, correct_counts, n=8, ks=(1, 2, 4, 8)):
    stats = collapse_stats(np.full(len(correct_counts), n), np.array(correct_counts), ks)
    return {
        "step": step,
        "alpha": alpha,
        **stats.scalars(),
        "maj@8": stats.pass_at[1],
        "rho_hist": [int(x) for x in stats.rho_histogram],
        "num_problems": len(correct_counts),
    }


@pytest.fixture
def history():
    rng = np.random.default_rng(0)
    records = [record(10, 0.0, rng.integers(1, 8, 40))]
    for step in (20, 30):
        records.append(record(step, 1.0, rng.integers(0, 9, 40)))
    records += [record(30, alpha, rng.integers(0, 9, 40)) for alpha in (0.25, 0.5, 0.75)]
    return records


def test_table_lists_early_each_current_and_final_grid(history):
    rows = table_rows(history)
    assert [(r["step"], r["alpha"]) for r in rows] == [
        (10, 0.0),
        (20, 1.0),
        (30, 0.25),
        (30, 0.5),
        (30, 0.75),
        (30, 1.0),
    ]
    text = format_table(history)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "pass@8" in lines[0] and "rho=0" in lines[0]
    assert "early snapshot" in lines[2] and "WiSE-FT a=0.50" in text
    final = rows[-1]
    assert lines[-1].split()[-1] == str(round(final["frac_rho1"] * 40))


def test_plot_writes_png_from_history_file(tmp_path, history):
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in history))
    records = read_history(tmp_path)
    assert records == history
    out = plot_history(records, tmp_path / "report.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_history_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history file"):
        read_history(tmp_path)
    (tmp_path / "history.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_history(tmp_path)
