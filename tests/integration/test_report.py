"""``chatos-retrain report`` (issue 16): one self-contained HTML page, for an empty state and for a populated one
(a real store ingested, a real dataset built, jobs with real metrics.jsonl files judged by the real gate, model
versions and a rollback recorded through the State API), rendered in a real headless Chromium (Debian's package):
the screenshot is not blank and the plots are there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, need, need_module, rec, write_lines

from daemon import api, settings
from daemon.state import JobRow, ModelRow, State
from daemon.train import gate

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script>"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    need(found, "no chromium: apt-get install chromium (.ci/host-setup.sh installs it)")
    assert found is not None
    return found


def screenshot(page: Path, out: Path) -> Any:
    """The page rendered by headless Chromium, as a Pillow image."""
    image = need_module("PIL.Image", "Pillow comes with matplotlib: pip install -e '.[dev]'")
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return image.open(out).convert("RGB")


def colours(img: Any) -> int:
    """Distinct colours in an image (a blank page has one)."""
    return len(img.getcolors(maxcolors=img.width * img.height))


def report(cfg: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "report", "--out", str(out),
                           *flags], capture_output=True, text=True, timeout=300)


def config(tmp_path: Path, store: Path) -> Path:
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: {tmp_path / 'state'}\n")
    return cfg


def test_an_empty_state_says_what_is_missing_and_draws_no_plot(tmp_path: Path, store: Path) -> None:
    need_module("matplotlib", "the report extra: pip install -e '.[dev]'")
    out = report(config(tmp_path, store), tmp_path / "out")
    assert out.returncode == 0, out.stderr
    page = Path(out.stdout.strip())
    assert page == tmp_path / "out" / "index.html" and out.stderr == ""
    text = page.read_text()
    assert "<svg" not in text and "No model versions yet" in text and "No training jobs yet" in text
    assert "No eligible examples or feedback yet" in text and "No dataset version yet" in text
    img = screenshot(page, tmp_path / "empty.png")
    assert colours(img) > 20  # text on a background, not a blank page


def _metrics(job_dir: Path, job_id: str, steps: int, start: float) -> None:
    lines: list[dict[str, Any]] = [{"job_id": job_id, "event": "job_started", "max_steps": steps}]
    lines.append({"event": "evaluated", "phase": "base", "eval_loss": start + 0.2})
    lines += [{"step": i, "train_loss": start - i * 0.05, "tokens_per_s": 400.0 + i, "epoch": i / steps,
               **({"eval_loss": start - i * 0.04} if i % 5 == 0 else {})} for i in range(1, steps + 1)]
    lines.append({"event": "evaluated", "phase": "candidate", "eval_loss": start - steps * 0.04})
    job_dir.mkdir(parents=True)
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def _job(st: State, job_id: str, version: int, status: str, *, start: float, champion: float | None,
         at: datetime, error: str | None = None) -> None:
    job_dir = st.dir / "jobs" / job_id
    _metrics(job_dir, job_id, 20, start)
    decision = gate.judge(gate.Evidence(champion_name=HOSTILE if champion else "the base model",
                                        eval_loss=(start - 0.8, champion if champion else start + 0.2),
                                        canary=(2.0, 2.01)), gate.Limits())
    with st.transaction():
        st.jobs.add(JobRow(job_id=job_id, dataset_version=version, status="running", job_dir=str(job_dir),
                           config_path=str(job_dir / "config.yaml"), log_path=str(job_dir / "job.log"),
                           metrics_path=str(job_dir / "metrics.jsonl"), result_path=str(job_dir / "result.json"),
                           params={"training": {"max_steps": 20}}, created_at=at.isoformat()))
        st.jobs.finished(job_id, status="succeeded", exit_code=0, error=None, result={"tokens_per_s": 410.5},
                         latest_metrics={"step": 20}, finished_at=(at + timedelta(minutes=7)).isoformat())
        st.jobs.running(job_id, pid=1, pid_start=None, started_at=at.isoformat())
        st.jobs.judged(job_id, status=status, error=error, gate=decision.numbers)


def _model(st: State, version: int, job_id: str, at: datetime) -> None:
    with st.transaction():
        st.models.add(ModelRow(version=version, job_id=job_id, dataset_version=1, gguf_path=f"/x/v{version}.gguf",
                               gguf_sha256="0" * 64, gguf_size=1000, chat_template="qwen-2.5",
                               status="registered", tag=f"chatos-retrained:v{version}", created_at=at.isoformat()))


def populated(tmp_path: Path, store: Path) -> Path:
    """A store with chats over five days and feedback, ingested and built into a dataset through the API; three
    judged jobs (two exported as v1 and v2, one rejected); latest moved to v1, v2, then rolled back to v1."""
    cfg = config(tmp_path, store)
    for day in range(5):
        when = T0 + timedelta(days=day)
        recs = [rec(f"c{day}-{i}", user=f"Question {day}-{i}: how do I sort?", answer=f"Answer {day} {i}: sorted.",
                    started_at=when.replace(tzinfo=None).isoformat(), thumbs_up=True, quality="good")
                for i in range(4 + day)]
        write_lines(logs_file(store, when.strftime("%Y-%m-%d")), recs)
        write_lines(feedback_file(store, when.strftime("%Y-%m-%d")),
                    [fb(f"c{day}-{i}", thumbs_up=i % 3 != 0, ts=(when + timedelta(hours=i)).replace(tzinfo=None)
                        .isoformat()) for i in range(3 + day)])
    s, _ = settings.load(cfg)
    with api.open_state(s) as st:
        api.build_dataset(s, st)
        _job(st, "j-20261120T100000-aaaa", 1, "promoted", start=2.5, champion=None, at=T0)
        _job(st, "j-20261122T100000-bbbb", 1, "promoted", start=2.0, champion=1.9, at=T0 + timedelta(days=2))
        _job(st, "j-20261124T100000-cccc", 1, "rejected", start=2.6, champion=1.2, at=T0 + timedelta(days=4),
             error=f"loss worse {HOSTILE}")
        _model(st, 1, "j-20261120T100000-aaaa", T0)
        _model(st, 2, "j-20261122T100000-bbbb", T0 + timedelta(days=2))
        with st.transaction():
            st.service.latest_moved(1, previous=None, how="registered", at=T0.isoformat())
            st.service.latest_moved(2, previous=1, how="registered", at=(T0 + timedelta(days=2)).isoformat())
            st.service.latest_moved(1, previous=2, how="rollback", at=(T0 + timedelta(days=3)).isoformat())
            st.service.set_latest_model(1)
    return cfg


def test_a_populated_state_renders_every_plot_in_a_real_browser(tmp_path: Path, store: Path) -> None:
    need_module("matplotlib", "the report extra: pip install -e '.[dev]'")
    cfg = populated(tmp_path, store)
    out = report(cfg, tmp_path / "out", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    page = Path(answer["path"])
    text = page.read_text()
    # gate (1) + a loss curve per job (3) + speed (1) + days (1) + datasets (1)
    assert answer["plots"] == len(re.findall(r"<svg\b", text)) == 7
    assert [d["day"] for d in answer["report"]["days"]] == [f"2026-11-{20 + d}" for d in range(5)]
    assert [m["how"] for m in answer["report"]["moves"]] == ["registered", "registered", "rollback"]
    for title in ("eval loss on the held-out split", "canary perplexity", "v2: promoted", "eligible examples per day",
                  "feedback per day", "dataset versions (examples)", "job wall time (minutes)"):
        assert title in text, title
    assert "v1 (latest)" in text and "1 rollback(s)" in text
    assert HOSTILE not in text and html_escaped(HOSTILE) in text  # every text from state is escaped
    assert not re.search(r"""(src|href)=["']?(https?:|//)|url\((?!#)|<script|<link|<img""", text)  # self-contained
    img = screenshot(page, tmp_path / "report.png")
    assert colours(img) > 200  # plots in colour, not a blank or text-only page
    width, height = img.size
    band = img.crop((0, height // 4, width, height // 2))  # plots fill the middle of the page
    assert colours(band) > 100


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


@pytest.mark.parametrize("flag", ["--open"])
def test_open_without_a_browser_says_so(tmp_path: Path, store: Path, flag: str) -> None:
    need_module("matplotlib", "the report extra: pip install -e '.[dev]'")
    cfg = config(tmp_path, store)
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), "BROWSER": ""}
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "report", "--out",
                          str(tmp_path / "o"), flag], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "no browser found" in out.stderr and (tmp_path / "o" / "index.html").is_file()


def test_one_version_draws_its_own_plots_and_says_what_else_is_missing(tmp_path: Path, store: Path) -> None:
    need_module("matplotlib", "the report extra: pip install -e '.[dev]'")
    from daemon.report import data, page

    s, _ = settings.load(config(tmp_path, store))
    with api.open_state(s) as st:
        _job(st, "j-20261120T100000-aaaa", 1, "promoted", start=2.5, champion=None, at=T0)
        _model(st, 1, "j-20261120T100000-aaaa", T0)
        with st.transaction():
            st.service.latest_moved(1, previous=None, how="registered", at=T0.isoformat())
            st.service.set_latest_model(1)
        text = page.render(data.gather(s, st))
    assert page.plot_count(text) == 3  # the gate, v1's loss curve, its speed
    assert "v1 (latest)" in text and "0 rollback(s)" in text and "v1: promoted" in text
    assert "No eligible examples or feedback yet" in text and "No dataset version yet" in text
