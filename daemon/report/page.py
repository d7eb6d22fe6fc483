"""The report page: matplotlib plots (Agg, SVG inlined) and the HTML around them, self-contained (no scripts, no
network, no files beside it). Imported only by the ``report`` verb, when it runs: matplotlib is an optional extra
(``chatos-retrain[report]``) and never enters the service's import path.

Every plot function takes plain values from :mod:`daemon.report.data` and returns an SVG string, or None when there
is nothing to draw (the page then says what is missing instead of showing an empty plot). All text from state or
the store is escaped (``html.escape``).
"""

from __future__ import annotations

import html
import io
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from daemon.report.data import Day, JobView, Report

matplotlib.use("Agg")  # no display, no GUI toolkit; figures are made without pyplot (no global figure registry)

CANDIDATE, CHAMPION, UP, DOWN, EVENTS = "#3b6fb6", "#b0b7c3", "#3a9a5b", "#c8553d", "#6b4c9a"
STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "font.size": 9, "axes.titlesize": 10, "svg.fonttype": "path", "figure.dpi": 100}
CURVES = 6  # loss curves drawn (the newest jobs)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)  # RDF boilerplate, ~600 bytes a plot


@contextmanager
def _figure(name: str, width: float, height: float, ncols: int = 1) -> Iterator[tuple[Figure, Any]]:
    with matplotlib.rc_context({**STYLE, "svg.hashsalt": name}):  # a salt per plot: ids stay distinct on a page
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig, fig.subplots(1, ncols)


def svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element (no XML declaration or doctype)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return METADATA.sub("", text[text.index("<svg"):])


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def axes_handles(fig: Figure) -> tuple[list[Any], list[str]]:
    """The legend entries of a figure's first axes (its panels share them)."""
    handles, labels = fig.axes[0].get_legend_handles_labels() if fig.axes else ([], [])
    if not handles and len(fig.axes) > 1:
        handles, labels = fig.axes[-1].get_legend_handles_labels()
    return handles, labels


def _bars(ax: Any, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None], str]]) -> None:
    """Grouped bars: one group per label, one bar per series (a missing value leaves a gap)."""
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar([x for x, v in zip(xs, values, strict=True) if v is not None],
               [v for v in values if v is not None], width, label=name, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")


def gate_plot(jobs: Sequence[JobView]) -> str | None:
    """Eval loss and canary perplexity, candidate vs champion, for each judged job."""
    panels = []
    for name, title in (("loss", "eval loss on the held-out split"), ("canary", "canary perplexity")):
        rows = [(j.label, c) for j in jobs for c in j.checks if c.name == name and c.candidate is not None]
        if rows:
            panels.append((title, rows))
    if not panels:
        return None
    with _figure("gate", 4.2 * len(panels), 2.8, ncols=len(panels)) as (fig, axes):
        for ax, (title, rows) in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
            _bars(ax, [r[0] for r in rows], [("candidate", [r[1].candidate for r in rows], CANDIDATE),
                                             ("champion", [r[1].champion for r in rows], CHAMPION)])
            values = [v for r in rows for v in (r[1].candidate, r[1].champion) if v is not None]
            low, high = min(values), max(values)
            pad = (high - low) * 0.3 or abs(high) * 0.05 or 1.0
            ax.set_ylim(low - pad, high + pad)  # the differences, not the distance from 0
            for bars in ax.containers:
                ax.bar_label(bars, fmt=_short, fontsize=7, padding=2)
            ax.set_title(title)
        fig.legend(*axes_handles(fig), loc="outside lower center", ncols=2, fontsize=8)
        return svg(fig)


def loss_plot(job: JobView) -> str | None:
    """One job's train loss over its steps, and its eval loss (the base at step 0, the candidate at the end)."""
    if not job.train_loss and not job.eval_loss:
        return None
    with _figure(f"loss-{job.job_id}", 4.0, 2.6) as (fig, ax):
        if job.train_loss:
            ax.plot(*zip(*job.train_loss, strict=True), color=CANDIDATE, label="train loss", linewidth=1.4)
        if job.eval_loss:
            ax.plot(*zip(*job.eval_loss, strict=True), color=DOWN, marker="o", markersize=4, linewidth=1,
                    linestyle="--", label="eval loss")
        ax.set_title(f"{job.label}: {job.status}")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        return svg(fig)


def speed_plot(jobs: Sequence[JobView]) -> str | None:
    """Tokens/s and wall time per job (oldest first)."""
    rows = [j for j in jobs if j.tokens_per_s is not None or j.wall_s is not None]
    if not rows:
        return None
    with _figure("speed", 8.4, 2.6, ncols=2) as (fig, (left, right)):
        labels = [j.label for j in rows]
        _bars(left, labels, [("tokens/s", [j.tokens_per_s for j in rows], CANDIDATE)])
        left.set_title("training throughput (tokens/s)")
        minutes = [j.wall_s / 60 if j.wall_s is not None else None for j in rows]
        _bars(right, labels, [("wall time", minutes, CHAMPION)])
        right.set_title("job wall time (minutes)")
        return svg(fig)


def days_plot(days: Sequence[Day]) -> str | None:
    """Eligible examples per day (by when their chat started), and thumbs up/down and feedback events per day."""
    if not days:
        return None
    with _figure("days", 8.4, 2.8, ncols=2) as (fig, (left, right)):
        xs = list(range(len(days)))
        labels = [d.day[5:] for d in days]  # MM-DD
        left.bar(xs, [d.eligible for d in days], color=CANDIDATE)
        left.set_title("eligible examples per day")
        right.bar(xs, [d.thumbs_up for d in days], color=UP, label="thumbs up")
        right.bar(xs, [-d.thumbs_down for d in days], color=DOWN, label="thumbs down")
        right.plot(xs, [d.feedback_events for d in days], color=EVENTS, marker=".", label="feedback events")
        right.axhline(0, color="#444", linewidth=0.6)
        right.set_title("feedback per day")
        fig.legend(*axes_handles(fig), loc="outside lower center", ncols=3, fontsize=8)
        step = max(1, len(days) // 10)
        for ax in (left, right):
            ax.set_xticks(xs[::step], labels[::step], rotation=30 if len(days) > 5 else 0)
        return svg(fig)


def datasets_plot(report: Report) -> str | None:
    if not report.datasets:
        return None
    with _figure("datasets", 4.2, 2.6) as (fig, ax):
        xs = [f"v{d.version}" for d in report.datasets]
        ax.bar(xs, [d.train for d in report.datasets], color=CANDIDATE, label="train")
        ax.bar(xs, [d.eval for d in report.datasets], bottom=[d.train for d in report.datasets], color=CHAMPION,
               label="eval")
        ax.set_title("dataset versions (examples)")
        ax.legend(fontsize=8)
        return svg(fig)


# -- the page ------------------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em 1.5em;color:#1d2430;
background:#fafbfc}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #dde1e6}
.muted{color:#667}.empty{color:#8a5a00;background:#fff6e0;padding:.5em .8em;border-radius:4px}
table{border-collapse:collapse;margin:.4em 0;font-size:13px}td,th{padding:.25em .7em;border-bottom:1px solid #e3e6ea;
text-align:left;vertical-align:top}th{background:#eef1f4}
.grid{display:flex;flex-wrap:wrap;gap:.6em}.grid>div{flex:0 0 auto}
svg{max-width:100%;height:auto}.passed{color:#2c7a47}.FAILED{color:#b3261e;font-weight:600}
.skipped,.pending{color:#777}.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde1e6;
border-radius:6px;padding:.5em 1em}.card b{display:block;font-size:1.4em}
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], raw: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped except the columns in ``raw`` (markup built here)."""
    out = ["<table><tr>", *(f"<th>{_esc(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell if i in raw else _esc(cell)}</td>" for i, cell in enumerate(row))
                   + "</tr>")
    out.append("</table>")
    return "".join(out)


def _empty(text: str) -> str:
    return f'<p class="empty">{_esc(text)}</p>'


def _plot(svg_text: str | None, missing: str) -> str:
    return svg_text if svg_text is not None else _empty(missing)


def _versions(r: Report) -> str:
    if not r.models:
        return _empty("No model versions yet: a version appears when a trained job passes the gate and is exported.")
    rows = [(f"v{m.version}" + (" (latest)" if m.version == r.latest else ""), m.tag, m.job_id,
             f"v{m.dataset_version}", m.status, m.created_at) for m in reversed(r.models)]
    table = _table(("version", "Ollama tag", "job", "dataset", "status", "created"), rows)
    if not r.moves:
        return table + '<p class="muted">latest has not moved yet (no registration or rollback recorded).</p>'
    moves = [(m.at, f"v{m.version}", f"v{m.previous}" if m.previous else "none",
              "rollback" if m.how == "rollback" else "promoted") for m in reversed(r.moves)]
    rollbacks = sum(1 for m in r.moves if m.how == "rollback")
    return (table + f"<h3>History of latest ({rollbacks} rollback(s))</h3>"
            + _table(("when", "latest", "before", "how"), moves))


def _gate(r: Report) -> str:
    judged = [j for j in r.jobs if j.checks]
    if not judged:
        return _empty("No job has been judged by the gate yet.")
    names = sorted({c.name for j in judged for c in j.checks}, key=lambda n: [c.name for j in judged
                                                                             for c in j.checks].index(n))
    rows = []
    for j in reversed(judged):
        by = {c.name: c for c in j.checks}
        cells = [f'<span class="{_esc(by[n].state)}" title="{_esc(by[n].detail)}">{_esc(by[n].state)}</span>'
                 if n in by else "" for n in names]
        rows.append((_esc(j.label), _esc(j.job_id), _esc(j.status), _esc(j.champion or "-"), *cells))
    table = _table(("model", "job", "verdict", "against", *names), rows, raw=range(4 + len(names)))
    return _plot(gate_plot(judged), "The gate's checks carried no numbers to plot.") + table


def _curves(r: Report) -> str:
    if not r.jobs:
        return _empty("No training jobs yet: loss curves appear once a job has run.")
    parts = []
    for j in r.jobs[-CURVES:][::-1]:
        drawn = loss_plot(j)
        why = f"{j.label}: {j.metrics_note or 'no loss logged'}"
        parts.append(f"<div>{drawn or _empty(why)}</div>")
    return '<div class="grid">' + "".join(parts) + "</div>"


def _jobs(r: Report) -> str:
    rows = [(j.job_id, j.status, f"v{j.dataset_version}", j.label if j.model_version is not None else "-",
             f"{j.wall_s / 60:.1f} min" if j.wall_s is not None else "-",
             f"{j.tokens_per_s:,.0f}" if j.tokens_per_s is not None else "-", j.error or "")
            for j in reversed(r.jobs)]
    return _table(("job", "status", "dataset", "model", "wall time", "tokens/s", "error"), rows) if rows else ""


def render(r: Report) -> str:
    """The whole page."""
    latest = f"v{r.latest}" if r.latest else "none"
    cards = [("latest", latest), ("model versions", len(r.models)), ("jobs shown", len(r.jobs)),
             ("dataset versions", len(r.datasets)), ("eligible examples", r.eligible),
             ("feedback events", r.feedback_events)]
    cycles = ", ".join(f"{k} {v}" for k, v in sorted(r.cycles.items())) or "none yet"
    body = [
        "<h1>chatos-retrain report</h1>",
        f'<p class="muted">generated {_esc(r.generated_at)} from state {_esc(r.state_dir)} '
        f"(store {_esc(r.store_root)}); cycles: {_esc(cycles)}</p>",
        '<div class="cards">' + "".join(f'<div class="card">{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in cards)
        + "</div>",
        "<h2>Model versions and latest</h2>", _versions(r),
        "<h2>The gate: each candidate against the champion</h2>", _gate(r),
        "<h2>Loss curves of recent jobs</h2>", _curves(r),
        "<h2>Speed: tokens/s and wall time</h2>",
        _plot(speed_plot(r.jobs), "No finished job yet: throughput and wall time appear after the first one."),
        _jobs(r),
        "<h2>Data: examples and feedback per day</h2>",
        _plot(days_plot(r.days), "No eligible examples or feedback yet: rate some chats in ChatOS "
              "(or `chatos-retrain feedback`) and run `chatos-retrain ingest`."),
        "<h2>Dataset versions</h2>",
        _plot(datasets_plot(r), "No dataset version yet: `chatos-retrain dataset build` writes the first."),
    ]
    if r.datasets:
        body.append(_table(("version", "created", "train", "eval"),
                           [(f"v{d.version}", d.created_at, d.train, d.eval) for d in reversed(r.datasets)]))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>chatos-retrain report</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def write(out_dir: Path, page: str) -> Path:
    """``out_dir/index.html``, replaced atomically (a temporary file in the same folder, then a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "index.html"
    fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


SVG_TAG = re.compile(r"<svg\b")


def plot_count(page: str) -> int:
    """How many inline SVG plots a page holds."""
    return len(SVG_TAG.findall(page))
