"""House rules that keep the service safe, checked on the source: one module spawns processes, two speak HTTP
(Ollama, the webhook), no shell anywhere, the service never imports the training stack, secure defaults."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from daemon.settings import Settings

PKG = Path(__file__).resolve().parents[2] / "daemon"
SERVICE_MODULES = sorted(p for p in PKG.rglob("*.py") if "trainer" not in p.relative_to(PKG).parts)
HEAVY = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"}


def imports(path: Path) -> set[str]:
    return imports_of(ast.walk(ast.parse(path.read_text())))


def imports_of(nodes: Iterable[ast.AST]) -> set[str]:
    """The top-level packages that ``nodes`` import (absolute imports only)."""
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_only_proc_spawns_processes() -> None:
    spawners = [p.name for p in SERVICE_MODULES if {"subprocess", "multiprocessing"} & imports(p)]
    assert spawners == ["proc.py"]


def test_only_the_state_package_speaks_sql() -> None:
    sql = [str(p.relative_to(PKG)) for p in SERVICE_MODULES if "sqlite3" in imports(p) and "state" not in p.parts]
    assert sql == []


# The modules that may speak HTTP, each with a reason: the Ollama adapter (its API), and the webhook notifier
# (notify.webhook: one signed JSON POST to an operator's receiver, loopback unless allowed, like ollama.host). Both
# set timeouts, never follow redirects and take no proxy from the environment.
HTTP_MODULES = {"publish/ollama_client.py", "notify/webhook.py"}


def test_only_the_ollama_adapter_and_the_webhook_speak_http() -> None:
    http = [str(p.relative_to(PKG)) for p in SERVICE_MODULES
            if {"httpx", "requests", "urllib3", "http", "ollama"} & imports(p)]
    assert sorted(http) == sorted(HTTP_MODULES)


# The one module that speaks to a Ray cluster (its Jobs API), with the import inside the calls: the service starts,
# and runs training.executor: local, without the [ray] extra.
RAY_MODULES = {"train/ray_client.py"}


def top_level_imports(path: Path) -> set[str]:
    """What the module imports when it is imported (not inside its functions)."""
    return imports_of(ast.parse(path.read_text()).body)


def test_only_the_ray_adapter_speaks_to_ray_and_imports_it_lazily() -> None:
    ray = [str(p.relative_to(PKG)) for p in SERVICE_MODULES if "ray" in imports(p)]
    assert sorted(ray) == sorted(RAY_MODULES)
    eager = [m for m in RAY_MODULES if "ray" in top_level_imports(PKG / m)]
    assert eager == []


def test_the_service_never_imports_the_training_stack() -> None:
    offenders = {p.name: sorted(HEAVY & imports(p)) for p in SERVICE_MODULES if HEAVY & imports(p)}
    assert offenders == {}


@pytest.mark.parametrize("path", [*SERVICE_MODULES, *sorted((PKG / "trainer").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_no_shell_anywhere(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                assert not (kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value), \
                    f"shell=True at {path.name}:{node.lineno}"
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                assert (f.value.id, f.attr) not in {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                                                    ("subprocess", "getstatusoutput")}, f"{path.name}:{node.lineno}"


# The plotting library of `chatos-retrain report` (an optional extra): one module draws the page, and only the
# report verb imports it, when it runs.
PLOTTING = {"matplotlib", "plotly", "bokeh", "seaborn"}


def test_only_the_report_page_imports_the_plotting_library() -> None:
    plotting = [str(p.relative_to(PKG)) for p in SERVICE_MODULES if PLOTTING & imports(p)]
    assert plotting == ["report/page.py"]


def test_the_service_and_the_cli_never_load_the_plotting_library() -> None:
    """Importing the service, every verb's module and the report's data does not load matplotlib (the verb
    imports the page lazily): the service runs without the report extra installed."""
    code = ("import sys, daemon.cli, daemon.service.lifecycle, daemon.cycle.pipeline, daemon.report.data; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(PLOTTING)!r} "
            "or m == 'daemon.report.page'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_training_scripts_import_nothing_of_the_service() -> None:
    for p in (PKG / "trainer").glob("*.py"):
        assert "daemon" not in imports(p), p.name


def test_secure_defaults() -> None:
    s = Settings()
    assert s.dataset.pii_scrub and {"email", "secret"} <= set(s.dataset.pii_kinds)
    assert s.ollama.host.startswith("http://127.0.0.1") and not s.ollama.allow_remote



# That conversation text never reaches a command line is checked with real processes, a real store and the real
# runner: tests/integration/test_secrets_off_argv.py.
