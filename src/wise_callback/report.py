"""Tables and plots of a run's history (the records of `WiSEFTCallback.history` / history.jsonl).

A record is one evaluation of one alpha: {"step", "alpha", "pass@1", ..., "maj@k", "mean_rho",
"var_rho", "frac_rho0", "frac_rho1", "rho_hist", "num_problems", ...}. alpha = 1.0 is the current
weights, alpha = 0.0 the early snapshot, anything between a WiSE-FT interpolant. Where a record
carries a standard error for a metric (key "<metric>_se"), the plots draw it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from wise_callback.files import write_atomically

EARLY, CURRENT = 0.0, 1.0
_AT_K = re.compile(r"^(pass|maj)@(\d+)$")


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a history.jsonl file (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no history file at {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from None
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def ks_of(records: Iterable[dict[str, Any]], metric: str = "pass") -> list[int]:
    """The k values for which the records carry `metric@k`, ascending."""
    ks = {int(m[2]) for r in records for key in r if (m := _AT_K.match(key)) and m[1] == metric}
    return sorted(ks)


def _label(alpha: float) -> str:
    if alpha == EARLY:
        return "early snapshot"
    if alpha == CURRENT:
        return "current"
    return f"WiSE-FT a={alpha:.2f}"


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows worth reading: the early snapshot, every evaluation of the current weights, and
    every alpha of the final evaluation (in that order, without repeats)."""
    if not records:
        raise ValueError("no records to tabulate")
    final_step = max(r["step"] for r in records)
    rows = [r for r in records if r["alpha"] == EARLY][:1]
    rows += [r for r in records if r["alpha"] == CURRENT and r["step"] != final_step]
    rows += sorted(
        (r for r in records if r["step"] == final_step and r not in rows),
        key=lambda r: r["alpha"],
    )
    return rows


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of `table_rows(records)`: Pass@k for every k, Maj@k for the largest,
    the bias-variance terms, and how many problems sit at rho = 0 and rho = 1."""
    rows = table_rows(records)
    ks = ks_of(rows)
    maj_k = max(ks_of(rows, "maj"), default=None)
    header = ["step", "weights", *(f"pass@{k}" for k in ks)]
    header += [f"maj@{maj_k}"] if maj_k else []
    header += ["mean_rho", "var_rho", "rho=0", "rho=1"]
    lines = []
    for r in rows:
        problems = r.get("num_problems", 0)
        cells = [str(r["step"]), _label(r["alpha"])]
        cells += [_number(r.get(f"pass@{k}")) for k in ks]
        cells += [_number(r.get(f"maj@{maj_k}"))] if maj_k else []
        cells += [_number(r.get("mean_rho")), _number(r.get("var_rho"), 4)]
        cells += [str(round(r.get(key, math.nan) * problems)) for key in ("frac_rho0", "frac_rho1")]
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_history(
    records: Sequence[dict[str, Any]],
    out_path: str | os.PathLike[str],
    chosen_alpha: float | None = None,
) -> Path:
    """Draw report.png: Pass@k (largest k) over training steps per alpha; Pass@k against k for the
    early snapshot, the final weights and the chosen WiSE-FT; the rho histograms of those three.

    `chosen_alpha` defaults to the final evaluation's best alpha by the largest Pass@k. The file
    is written atomically.
    """
    if not records:
        raise ValueError("no records to plot")
    ks = ks_of(records)
    if not ks:
        raise ValueError("the records carry no pass@k metric to plot")
    top = f"pass@{ks[-1]}"
    final_step = max(r["step"] for r in records)
    final = {r["alpha"]: r for r in records if r["step"] == final_step}
    if chosen_alpha is None:
        wise = [a for a in final if EARLY < a < CURRENT] or list(final)
        chosen_alpha = max(wise, key=lambda a: (final[a].get(top, -1.0), a))
    early = next((r for r in records if r["alpha"] == EARLY), None)
    candidates = [
        ("early snapshot", early),
        ("final", final.get(CURRENT)),
        (f"WiSE-FT a={chosen_alpha:.2f}", final.get(chosen_alpha)),
    ]
    compared = [(name, r) for name, r in candidates if r is not None]

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    over_steps, over_k, histogram = figure.subplots(1, 3)
    for alpha in sorted({r["alpha"] for r in records if r["alpha"] != EARLY}):
        # an alpha that successive halving stopped early has no record of the largest k
        series = sorted(
            (r for r in records if r["alpha"] == alpha and top in r), key=lambda r: r["step"]
        )
        if series:
            _line(over_steps, [r["step"] for r in series], series, top, _label(alpha), "o-")
    if early is not None:
        over_steps.axhline(early[top], color="gray", linestyle=":", label="early snapshot")
    over_steps.set(xlabel="training step", ylabel=top, title=f"{top} during training")
    over_steps.legend(fontsize=8)

    for name, record in compared:
        keys = [k for k in ks if f"pass@{k}" in record]
        values = [record[f"pass@{k}"] for k in keys]
        errors = [record.get(f"pass@{k}_se") for k in keys]
        spread = errors if all(e is not None for e in errors) else None
        over_k.errorbar(keys, values, yerr=spread, fmt="o-", capsize=3, label=name)
    over_k.set_xscale("log", base=2)
    over_k.set_xticks(ks, [str(k) for k in ks])
    over_k.set(xlabel="k", ylabel="pass@k", title=f"pass@k at step {final_step}")
    over_k.legend(fontsize=8)

    width = 0.8 / max(len(compared), 1)
    for offset, (name, record) in enumerate(compared):
        counts = record.get("rho_hist")
        if not counts:
            continue
        centers = [(i + 0.5) / len(counts) for i in range(len(counts))]
        shift = (offset - (len(compared) - 1) / 2) * width / len(counts)
        histogram.bar([c + shift for c in centers], counts, width / len(counts), label=name)
    histogram.set(xlabel="rho = fraction of a problem's samples that are correct")
    histogram.set(ylabel="problems", title="where problems sit (collapse: mass at 0 and 1)")
    histogram.legend(fontsize=8)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out_path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def _line(
    axes: Any, steps: list[int], series: list[dict[str, Any]], key: str, label: str, style: str
) -> None:
    values = [r[key] for r in series]
    (line,) = axes.plot(steps, values, style, label=label, markersize=3)
    errors = [r.get(f"{key}_se") for r in series]
    if all(e is not None for e in errors):
        low = [v - e for v, e in zip(values, errors, strict=True)]
        high = [v + e for v, e in zip(values, errors, strict=True)]
        axes.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
