"""Stage: register a model version with Ollama (``latest`` moves only after it answers), and retry the
registrations that are pending (Ollama was down or failing) once their backoff has passed."""

from __future__ import annotations

from daemon.cycle.context import Cycle, Outcome
from daemon.publish import registry


def retry_pending(cycle: Cycle) -> bool:
    """Retry pending registrations first: an operator's trigger retries them now, whatever their backoff."""
    state, result = cycle.state, cycle.result
    if not (state.models.all(status="pending") or state.models.all(status="exported")):
        return True
    cycle.step("registering", "retrying pending registrations")
    for m in registry.retry_pending(cycle.settings, state, force=cycle.request.forced, now=cycle.now()):
        result.counts.setdefault("registrations_retried", []).append(f"v{m['version']}:{m['status']}")
        if m["status"] == "registered":
            result.model_tag = m["tag"]
    return True


def run(cycle: Cycle, version: int) -> None:
    """Register model ``version``; the outcome says whether it is ``latest``, pending a retry, or refused."""
    settings, result = cycle.settings, cycle.result
    cycle.step("registering", f"v{version} with Ollama at {settings.ollama.host}")
    with cycle.timed("register"):
        row = registry.register(settings, cycle.state, version, now=cycle.now())
    result.model_tag = row.get("tag")
    if row.get("status") == "registered":
        result.end(Outcome.REGISTERED, f"{result.reason}; registered {row['tag']} (latest)")
    elif row.get("status") == "pending":
        err = str(row.get("last_error") or "")
        why = err if err.startswith("Ollama not reachable") else f"Ollama at {settings.ollama.host} failed: {err}"
        result.end(Outcome.PENDING_REGISTRATION, f"{result.reason}; {why}; artifact kept, will retry")
    else:
        result.end(Outcome.REGISTER_FAILED, f"{result.reason}; registration failed: {row.get('last_error')}")
