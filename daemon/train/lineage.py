"""A model's lineage: the job that trained it and the warm-start ancestors it built on, the conversations they
trained on, and which of those the user has since deleted or un-voted (then warm starts stop until a full retrain
from the base leaves them out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.settings import DatasetSettings
from daemon.state import JobRow, State
from daemon.train import plan

MAX_CHAIN = 1000  # a guard against a parent loop in a damaged database


def chain(state: State, job_id: str) -> list[JobRow]:
    """``job_id``'s row and its warm-start ancestors', newest first (one row for a model trained from the base)."""
    out: list[JobRow] = []
    seen: set[str] = set()
    current: str | None = job_id
    while current and current not in seen and len(out) < MAX_CHAIN:
        row = state.jobs.get(current)
        if row is None:
            break
        out.append(row)
        seen.add(current)
        p = row.params.get("plan") or {}
        current = p.get("parent_job") if p.get("init") == "champion" else None
    return out


def forgotten(state: State, cfg: DatasetSettings, job_id: str) -> list[str]:
    """Conversations in ``job_id``'s lineage that the dataset would no longer hold (deleted, or vote retracted)."""
    ids = [r.job_id for r in chain(state, job_id)]
    return state.examples.no_longer_eligible(ids, cfg.modes, cfg.min_score, cfg.include_unrated) if ids else []


@dataclass(frozen=True)
class ChampionLineage:
    champion: plan.Champion
    adapter: Path
    rehearsed: dict[str, int]
    forgotten: list[str]


def champion(state: State, cfg: DatasetSettings) -> ChampionLineage | None:
    """The champion as a plan sees it (its shape, dataset, warm-start depth, forgotten chats), or None."""
    job_id = state.service.get().champion_job
    rows = chain(state, job_id) if job_id else []
    if not rows or not rows[0].result:
        return None
    row, result = rows[0], rows[0].result or {}
    adapter = Path(str(result.get("adapter_dir") or ""))
    shape = plan.Shape.of(row.params.get("model") or {}, row.params.get("lora") or {})
    ids = [r.job_id for r in rows]
    gone = state.examples.no_longer_eligible(ids, cfg.modes, cfg.min_score, cfg.include_unrated)
    champ = plan.Champion(row.job_id, row.dataset_version, shape, adapter.is_dir() and adapter != Path(),
                          warm_depth=len(rows) - 1, forgotten=len(gone))
    return ChampionLineage(champ, adapter, dict(state.jobs.trained(ids)), gone)
