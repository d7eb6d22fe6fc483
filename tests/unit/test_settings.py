"""Configuration: strict, every error with its path, env overrides, paths made absolute, documented keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon import cli, settings
from daemon.settings import ConfigError, Settings, format_errors, load, parse_duration

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "retrain.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(path)
    return ei.value.errors


def test_defaults_need_no_file() -> None:
    s, used = load(None)
    assert used is None
    assert s.store.root == Path("~/ChatOS-Memory").expanduser()
    assert s.store.root.is_absolute()
    assert s.dataset.modes == ["normal", "code"] and s.dataset.pii_scrub is True
    assert s.ollama.host == "http://127.0.0.1:11434"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfgdir = tmp_path / "etc"
    cfgdir.mkdir()
    p = write(cfgdir, "store:\n  root: ../memory\nstate:\n  dir: state\n")
    monkeypatch.chdir("/")
    s, _ = load(p)
    assert s.store.root == tmp_path / "memory"
    assert s.state.dir == cfgdir / "state"
    assert s.state_dir() == cfgdir / "state"


def test_env_overrides_yaml_and_nests_with_double_underscore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "dataset:\n  min_score: 1\n  modes: [normal]\n")
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__MIN_SCORE", "0")
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__MODES", "normal,code")
    monkeypatch.setenv("CHATOS_RETRAIN_STORE__ROOT", str(tmp_path / "m"))
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__INCLUDE_UNRATED", "true")
    s, _ = load(p)
    assert s.dataset.min_score == 0 and s.dataset.modes == ["normal", "code"] and s.dataset.include_unrated
    assert s.store.root == tmp_path / "m"


def test_cli_overrides_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__EVAL_FRACTION", "0.2")
    s, _ = load(None, overrides={"dataset": {"eval_fraction": 0.3}})
    assert s.dataset.eval_fraction == 0.3


def test_state_directory_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = load(write(tmp_path, f"state:\n  dir: {tmp_path / 'x'}\n"))
    assert s.state_dir() == tmp_path / "x"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    assert s.state_dir() == tmp_path / "sd"
    assert s.runtime_dir() == tmp_path / "sd"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "rt"))
    assert s.runtime_dir() == tmp_path / "rt"


def test_every_error_is_reported_with_its_path(tmp_path: Path) -> None:
    p = write(tmp_path, """
store:
  root: /nonexistent
  colour: blue
dataset:
  min_score: 7
  eval_fraction: 1.5
  modes: []
  pii_kinds: [email, dna]
policy:
  cooldown: soon
  min_new_examples: -1
  windows:
    - cron: "99 * * * *"
      duration: 4h
watch:
  settle_s: 10
  max_wait_s: 5
ollama:
  host: http://203.0.113.5:11434
bogus: 1
""")
    errs = errors_of(p)
    for expected in [
        "At 'store.colour': unknown key",
        "At 'dataset.min_score':",
        "At 'dataset.eval_fraction':",
        "At 'dataset.modes': at least one mode",
        "At 'dataset.pii_kinds': unknown PII kind",
        "At 'policy.cooldown': expected a duration",
        "At 'policy.min_new_examples':",
        "At 'policy.windows.0.cron': invalid cron expression",
        "At 'watch': watch.max_wait_s must be >= watch.settle_s",
        "At 'ollama': host 'http://203.0.113.5:11434' is not a loopback address",
        "At 'bogus': unknown key",
    ]:
        assert any(e.startswith(expected) for e in errs), (expected, errs)
    assert len(errs) == 11


@pytest.mark.parametrize(
    ("yaml_text", "ok"),
    [
        ("dataset:\n  min_score: -1\n", True),
        ("dataset:\n  min_score: 2\n", False),
        ("dataset:\n  eval_fraction: 0.0\n", True),
        ("dataset:\n  eval_fraction: 1.0\n", False),
        ("dataset:\n  modes: [code]\n", True),
        ("dataset:\n  modes: []\n", False),
        ("policy:\n  cooldown: 90m\n", True),
        ("policy:\n  cooldown: -5\n", False),
        ("policy:\n  min_positive_ratio: 1\n", True),
        ("policy:\n  min_positive_ratio: 1.1\n", False),
        ("policy:\n  max_runs_per_day: 0\n", False),
        ("policy:\n  windows: [{cron: '0 2 * * *', duration: 4h}]\n", True),
        ("policy:\n  windows: [{cron: '0 2 * *', duration: 4h}]\n", False),
        ("policy:\n  windows: [{cron: '0 2 * * *'}]\n", False),
        ("watch:\n  settle_s: 0\n", False),
        ("ollama:\n  host: http://localhost:11434\n", True),
        ("ollama:\n  host: http://10.1.2.3:11434\n  allow_remote: true\n", True),
        ("ollama:\n  host: not a url\n", False),
        ("training:\n  backend: unsloth\n", True),
        ("training:\n  backend: magic\n", False),
        ("export:\n  quantization: q4_k_m\n", True),
        ("export:\n  quantization: q3\n", False),
        ("store:\n  max_line_bytes: 0\n", False),
    ],
)
def test_each_rule_both_ways(tmp_path: Path, yaml_text: str, ok: bool) -> None:
    p = write(tmp_path, yaml_text)
    if ok:
        load(p)
    else:
        assert errors_of(p)


def test_store_root_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    errs = errors_of(write(tmp_path, f"store:\n  root: {f}\n"))
    assert errs == [f"At 'store.root': Value error, {f} exists and is not a directory"] or errs[0].startswith(
        "At 'store.root':")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("store: [1, 2\n", "invalid YAML (line"), ("- a\n- b\n", "expected a mapping"), ("\tstore: 1\n", "invalid YAML")],
)
def test_unparsable_files_give_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    errs = errors_of(write(tmp_path, text))
    assert len(errs) == 1 and fragment in errs[0] and "\n" not in errs[0]


def test_missing_file(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "nope.yaml") == ["At '': file not found"]


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    s, _ = load(write(tmp_path, ""))
    assert s.dataset.min_score == 1


def test_bad_env_value_is_reported_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__MIN_SCORE", "lots")
    with pytest.raises(ConfigError) as ei:
        load(None)
    assert ei.value.errors[0].startswith("At 'dataset.min_score':")


@pytest.mark.parametrize(("v", "s"), [(90, 90.0), ("90s", 90.0), ("15m", 900.0), ("6h", 21600.0), ("1d", 86400.0),
                                      ("250ms", 0.25), ("1.5h", 5400.0)])
def test_parse_duration(v: object, s: float) -> None:
    assert parse_duration(v) == s


def test_config_check_cli_prints_every_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "dataset:\n  min_score: 9\n  bogus: 1\n")
    assert cli.main(["config", "check", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{p}: At 'dataset.min_score': Input should be less than or equal to 1",
                   f"{p}: At 'dataset.bogus': unknown key"]
    good = write(tmp_path, "dataset:\n  min_score: 0\n", "good.yaml")
    assert cli.main(["config", "check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out


def test_config_show_json_is_the_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "dataset:\n  min_score: 0\n")
    monkeypatch.setenv("CHATOS_RETRAIN_DATASET__DEDUP", "false")
    assert cli.main(["--config", str(p), "config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dataset"]["min_score"] == 0 and data["dataset"]["dedup"] is False
    assert Path(data["store"]["root"]).is_absolute()
    assert cli.main(["--config", str(p), "config", "show"]) == 0
    assert "min_score: 0" in capsys.readouterr().out


def test_example_config_documents_every_key_and_is_valid() -> None:
    example = ROOT / "configs" / "retrain.example.yaml"
    text = example.read_text()
    documented = set()
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)#?\s?([a-z_]+):(?:\s|$)", line)
        if not m or (line.lstrip().startswith("# ") and not re.match(r"^\s*#\s?[a-z_]+:", line)):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([s for _, s in stack] + [m.group(2)])
        documented.add(key)
        stack.append((indent, m.group(2)))
    missing = [k for k in settings.iter_keys() if k not in documented]
    assert not missing, f"undocumented config keys: {missing}"
    # every key line carries a comment (on the line or the line above)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s+[a-z_]+:", line) and "#" not in line:
            assert lines[i - 1].strip().startswith("#"), f"no comment for: {line.strip()}"
    Settings  # noqa: B018 - the example must load as-is
    load(example)


def test_gate_checks_and_required(tmp_path: Path) -> None:
    g = Settings().gate
    assert g.checks == ["loss", "learned_new", "preference", "canary", "regressions"] and g.required is None
    assert g.required_checks() == tuple(g.checks)
    assert (g.preference_tolerance, g.max_canary_increase, g.regressions_file) == (0.05, 0.10, None)
    p = tmp_path / "c.yaml"
    p.write_text("gate:\n  checks: [loss, canary]\n  required: [loss]\n  regressions_file: r.yaml\n")
    s, _ = load(p)
    assert s.gate.required_checks() == ("loss",) and s.gate.regressions_file is not None
    assert s.gate.regressions_file.is_absolute()
    p.write_text("gate:\n  checks: [loss]\n  required: [loss, canary]\n")
    assert any("gate.required names canary, which gate.checks does not run" in e for e in errors_of(p))
    p.write_text("gate:\n  checks: [loss, vibes]\n  max_canary_increase: -0.1\n")
    errs = errors_of(p)
    assert any(e.startswith("At 'gate.checks.1'") for e in errs), errs
    assert any(e.startswith("At 'gate.max_canary_increase'") for e in errs), errs
    p.write_text("gate:\n  checks: []\n")
    assert any(e.startswith("At 'gate.checks'") for e in errors_of(p))


def test_a_ray_executor_needs_ray_storage() -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(training={"executor": "ray"}, export={"executor": "ray"})
    assert format_errors(exc.value) == [
        "At 'ray.storage': empty, while training.executor and export.executor are ray: give it a directory both "
        "this machine and the Ray cluster see"]
    assert Settings(training={"executor": "ray"}, ray={"storage": "/mnt/jobs"}).ray.storage == "/mnt/jobs"
