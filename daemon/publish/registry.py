"""Model versions in Ollama: immutable ``<model_name>:v<N>``, a ``latest`` alias moved only after every check,
retention, rollback, lineage, and pending registrations retried with backoff when Ollama is down or failing.

State is the source of truth: a model row exists before anything is sent to Ollama; its status moves
``exported -> registered`` (or ``pending`` with ``next_attempt_at``, or ``failed``), and ``latest`` lives in state
too. A registration that fails after ``create`` removes the half-made tag, so nothing is half-registered.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon import faults, log
from daemon.publish import engine_check, modelfile, ollama
from daemon.publish.ollama import OllamaError
from daemon.publish.ollama_client import OllamaClient
from daemon.settings import Settings
from daemon.state import ModelRow, State, utcnow
from daemon.train import lineage as train_lineage
from daemon.train import templates
from daemon.train.backoff import retry_delay

_log = log.get("daemon.publish.registry")


class Rejected(Exception):
    """Ollama took the model but it does not check out (show or smoke test): a hard failure, not retried."""


def tag(settings: Settings, version: int) -> str:
    return f"{settings.ollama.model_name}:v{version}"


def latest_tag(settings: Settings) -> str:
    return f"{settings.ollama.model_name}:latest"


def model_spec(settings: Settings, template_name: str) -> ollama.ModelSpec:
    """What Ollama is told about a version trained with ``template_name``: the template's Go template and stop
    strings (always ours), the config's extra parameters and system prompt. The ``/api/create`` body and the
    Modelfile beside the GGUF are both built from it."""
    t = templates.get(template_name)
    return ollama.ModelSpec(template=t.ollama_template, stop=t.stop, options=settings.ollama.parameters,
                            system=settings.ollama.system)


def create_parameters(settings: Settings, template_name: str) -> dict[str, Any]:
    """Modelfile parameters: the config's extras, and the stop tokens of the training template (always ours)."""
    return model_spec(settings, template_name).parameters


def add_version(state: State, *, job_id: str, dataset_version: int, manifest_hash: str | None, gguf_path: str,
                gguf_sha256: str, gguf_size: int, architecture: str | None, chat_template: str,
                eval_numbers: dict[str, Any], settings: Settings) -> int:
    """Record an exported GGUF as the next model version (status ``exported``); returns N."""
    with state.transaction():
        version = state.models.next_version()
        state.models.add(ModelRow(
            version=version, job_id=job_id, dataset_version=dataset_version, manifest_hash=manifest_hash,
            gguf_path=gguf_path, gguf_sha256=gguf_sha256, gguf_size=gguf_size, architecture=architecture,
            chat_template=chat_template, eval=eval_numbers, status="exported", tag=tag(settings, version),
            attempts=0, created_at=utcnow(),
        ))
    return version


def write_modelfile(settings: Settings, gguf_path: str | Path, version: int,
                    spec: ollama.ModelSpec) -> Path | None:
    """Write the Modelfile beside a version's GGUF (``ollama create NAME -f Modelfile`` on another host); its path,
    or None (one warning) when it cannot be written: the Modelfile is a convenience, never a reason to fail."""
    name = tag(settings, version)
    try:
        return modelfile.write_beside(gguf_path, spec,
                                      comment=f"{name}, by chatos-retrain: ollama create {name} -f Modelfile")
    except (ValueError, OSError) as exc:
        _log.warning("export.modelfile_failed", model_version=version, gguf=str(gguf_path), reason=str(exc))
        return None


def register(settings: Settings, state: State, version: int, client: OllamaClient | None = None,
             now: datetime | None = None) -> dict[str, Any]:
    """Upload, create ``:v<N>``, verify with show, smoke-chat, then move ``latest`` and apply retention.

    Returns the updated model row. Never raises for Ollama problems: a retryable one leaves the version
    ``pending`` with a backoff, a hard one marks it ``failed``; either way ``latest`` is untouched.
    """
    row = state.models.get(version)
    if row is None:
        raise KeyError(f"no model version v{version}")
    own = client is None
    client = client or OllamaClient.from_settings(settings.ollama)
    name = row.tag
    created = False
    try:
        spec = model_spec(settings, row.chat_template)
        write_modelfile(settings, row.gguf_path, row.version, spec)  # what is sent, for an Ollama elsewhere too
        digest = client.ensure_blob(row.gguf_path, row.gguf_sha256)
        created = True  # from here on a failure may leave a (half-made) tag behind: clean it up
        client.create(name, {"model.gguf": digest}, template=spec.template, system=spec.system,
                      parameters=spec.parameters)
        faults.point("register.created")  # the tag exists, nothing verified yet
        show = client.show(name)
        problems = ollama.verify_show(show, architecture=row.architecture, template=spec.template,
                                      stops=list(spec.stop))
        if problems:
            raise Rejected(f"{name} does not verify: {'; '.join(problems)}")
        smoke = settings.export.smoke
        if smoke.enabled:
            chat = client.chat(name, [{"role": "user", "content": smoke.prompt}], num_predict=smoke.num_predict)
            problems = ollama.smoke_problems(chat, smoke.require_stop)
            if problems:
                raise Rejected(f"{name} smoke test failed: {'; '.join(problems)}")
        previous = state.service.get().latest_model
        client.copy(name, latest_tag(settings))
        faults.point("register.copied")  # latest moved in Ollama, not yet in state
        ollama_digest = next((m.get("digest") for m in client.tags() if m.get("name") == name), None)
        with state.transaction():
            state.models.registered(version, registered_at=utcnow(), ollama_digest=ollama_digest,
                                    attempts=row.attempts + 1)
            state.service.set_latest_model(version)
            state.service.latest_moved(version, previous=previous or None, how="registered", at=utcnow())
            if previous and previous != version:
                state.service.set_previous_latest_model(previous)
        _log.info("registry.registered", model_version=version, tag=name, latest=latest_tag(settings))
        faults.point("register.committed")
        retention(settings, state, client)
    except (OllamaError, Rejected, ValueError, OSError) as exc:
        _failed(settings, state, row, exc, client if created else None, now or datetime.now(UTC))
    finally:
        if own:
            client.close()
    done = state.models.get(version)
    return done.as_dict() if done else {}


def _failed(settings: Settings, state: State, row: ModelRow, exc: Exception, created_on: OllamaClient | None,
            now: datetime) -> None:
    version, name = row.version, row.tag
    if created_on is not None:  # created but not verified: take the half-made tag away again
        try:
            created_on.delete(name)
        except ollama.NotFound:
            pass
        except OllamaError as cleanup:
            _log.warning("registry.cleanup_failed", tag=name, reason=str(cleanup))
    retryable = isinstance(exc, OllamaError) and exc.retryable
    attempts = row.attempts + 1
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if retryable:
        delay = retry_delay(settings.ollama.retry_backoff, attempts, 6 * 3600.0)
        at = (now + timedelta(seconds=delay)).isoformat()
        with state.transaction():
            state.models.attempt_failed(version, status="pending", attempts=attempts, last_error=message,
                                        next_attempt_at=at)
        _log.warning("registry.pending", model_version=version, reason=message, retry_at=at, attempts=attempts)
    else:
        with state.transaction():
            state.models.attempt_failed(version, status="failed", attempts=attempts, last_error=message,
                                        next_attempt_at=None)
        _log.error("registry.failed", model_version=version, reason=message)


def retry_pending(settings: Settings, state: State, *, force: bool = False, now: datetime | None = None,
                  client: OllamaClient | None = None) -> list[dict[str, Any]]:
    """Register every pending (or freshly exported) version whose retry time has come (all of them if ``force``)."""
    now = now or datetime.now(UTC)
    done = []
    for row in state.models.all(status="pending") + state.models.all(status="exported"):
        at = row.next_attempt_at
        if force or not at or datetime.fromisoformat(at) <= now:
            done.append(register(settings, state, row.version, client=client, now=now))
    return done


def retention(settings: Settings, state: State, client: OllamaClient) -> list[int]:
    """Delete registered versions beyond ``ollama.keep_versions``; never the current or previous ``latest``."""
    keep = settings.ollama.keep_versions
    registered = [m.version for m in state.models.all(status="registered")]
    marks = state.service.get()
    protected = {v for v in (marks.latest_model, marks.previous_latest_model) if v}
    doomed = [v for v in registered[:-keep] if v not in protected] if len(registered) > keep else []
    deleted = []
    for v in doomed:
        row = state.models.get(v)
        if row is None:  # gone since the list was read: nothing to delete
            continue
        try:
            client.delete(row.tag)
        except ollama.NotFound:
            pass
        except OllamaError as exc:
            _log.warning("registry.retention_failed", model_version=v, reason=str(exc))
            continue
        with state.transaction():
            state.models.deleted(v)
        deleted.append(v)
    if deleted:
        _log.info("registry.retention", deleted=deleted, kept=keep)
    return deleted


def rollback(settings: Settings, state: State, to: int | None = None,
             client: OllamaClient | None = None, *, force: bool = False) -> dict[str, Any]:
    """Move ``latest`` to ``to`` (default: the registered version before the current one). Raises ValueError with a
    one-line reason when there is nowhere to go, or (without ``force``) when that version learned chats the user
    has since deleted or un-voted; OllamaError when Ollama refuses."""
    registered = [m.version for m in state.models.all(status="registered")]
    current = state.service.get().latest_model or None
    if to is None:
        older = [v for v in registered if current is None or v < current]
        if not older:
            raise ValueError(f"no registered version before v{current} to roll back to")
        to = older[-1]
    if to not in registered:
        raise ValueError(f"v{to} is not a registered version (registered: {', '.join(f'v{v}' for v in registered)})")
    own = client is None
    client = client or OllamaClient.from_settings(settings.ollama)
    try:
        row = state.models.get(to)
        if row is None:  # listed as registered a moment ago: only a concurrent forget removes it
            raise ValueError(f"v{to} is no longer a model version")
        gone = train_lineage.forgotten(state, settings.dataset, row.job_id)
        if gone and not force:
            raise ValueError(f"v{to} learned {len(gone)} chat(s) that were since deleted or un-voted "
                             f"(e.g. {gone[0]}); use --force to serve it anyway")
        loads = None
        if settings.export.engine.enabled and not force:  # served again only when its GGUF still loads
            loads = engine_check.check(settings, Path(row.gguf_path), row.chat_template)
            if not loads.ok:
                raise ValueError(f"v{to}'s GGUF no longer passes llama.cpp's load check ({loads.reason}); use "
                                 "--force to serve it anyway")
        client.show(row.tag)  # it must still exist in Ollama
        client.copy(row.tag, latest_tag(settings))
    finally:
        if own:
            client.close()
    with state.transaction():
        state.service.set_latest_model(to)
        state.service.latest_moved(to, previous=current, how="rollback", at=utcnow())
        if current and current != to:
            state.service.set_previous_latest_model(current)
    engine = (loads.reason if loads is not None else "skipped (--force)" if force
              else "skipped (export.engine.enabled: false)")
    _log.info("registry.rollback", latest=f"v{to}", previous=f"v{current}" if current else None, engine=engine)
    return {"latest": to, "previous": current, "tag": latest_tag(settings), "engine": engine}


def lineage(state: State) -> list[dict[str, Any]]:
    """Every model version with its job, dataset and manifest hash, GGUF digest, eval numbers and the Modelfile
    beside its GGUF (None when there is none, e.g. once retention removed the GGUF)."""
    latest = state.service.get().latest_model
    return [{**m.as_dict(), "latest": m.version == latest, "modelfile": _modelfile(m.gguf_path)}
            for m in state.models.all()]


def _modelfile(gguf_path: str) -> str | None:
    found = modelfile.describes(gguf_path)
    return str(found) if found else None
