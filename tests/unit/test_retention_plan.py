"""The disk retention plan: what may go and, above all, what must stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from daemon.cycle.retention_plan import DatasetFacts, JobFacts, ModelFacts, Rules, kept_versions, plan

NOW = datetime(2026, 12, 5, 12, tzinfo=UTC)
RULES = Rules(keep_versions=2, job_artifacts_age=timedelta(days=7), keep_datasets=2)


def model(v: int, status: str = "registered") -> ModelFacts:
    return ModelFacts(v, f"j{v}", v, status, f"/s/exports/j{v}/chatos-v{v}.gguf")


def job(name: str, status: str, ds: int, days_ago: float | None = 30) -> JobFacts:
    finished = None if days_ago is None else NOW - timedelta(days=days_ago)
    return JobFacts(name, status, ds, f"/s/jobs/{name}", finished)


def test_kept_versions_are_the_newest_registered_latest_previous_and_unregistered() -> None:
    models = [model(1), model(2), model(3), model(4), model(5, "pending"), model(6, "deleted")]
    assert kept_versions(models, 2, latest=1, previous=None) == {1, 3, 4, 5}
    assert kept_versions(models, 2, latest=4, previous=2) == {2, 3, 4, 5}


def test_the_plan_drops_old_ggufs_old_jobs_and_unreferenced_datasets() -> None:
    models = [model(v) for v in (1, 2, 3, 4)]
    jobs = [job(f"j{v}", "promoted", v) for v in (1, 2, 3, 4)]
    jobs += [job("jr", "rejected", 5), job("jf", "failed", 5, days_ago=1), job("jrun", "running", 2, None)]
    datasets = [DatasetFacts(v, f"/s/datasets/v{v}") for v in (1, 2, 3, 4, 5, 6)]
    got = plan(models, jobs, datasets, latest=4, previous=3, champion_job="j4", rules=RULES, now=NOW)
    assert got.ggufs == [(1, "/s/exports/j1/chatos-v1.gguf"), (2, "/s/exports/j2/chatos-v2.gguf")]
    # j1, j2: their versions left Ollama; jr: rejected a month ago. jf failed yesterday (younger than 7 days),
    # jrun still runs: both stay whole.
    assert got.job_artifacts == [("j1", "/s/jobs/j1"), ("j2", "/s/jobs/j2"), ("jr", "/s/jobs/jr")]
    # v2: the running job trains on it; v3, v4: kept models; v5, v6: the newest two.
    assert got.datasets == [(1, "/s/datasets/v1")]


def test_nothing_the_service_still_needs_is_planned_away() -> None:
    models = [model(1), model(2, "pending"), model(3, "exported")]
    jobs = [job("j1", "promoted", 1), job("j2", "promoted", 2), job("j3", "promoted", 3)]
    datasets = [DatasetFacts(v, f"/d/v{v}") for v in (1, 2, 3)]
    got = plan(models, jobs, datasets, latest=1, previous=None, champion_job="j3",
               rules=Rules(keep_versions=1, job_artifacts_age=timedelta(0), keep_datasets=1), now=NOW)
    assert got.empty(), got


def test_already_pruned_things_are_not_planned_again() -> None:
    jobs = [JobFacts("jr", "rejected", 1, "/s/jobs/jr", NOW - timedelta(days=30), pruned=True)]
    datasets = [DatasetFacts(1, "/d/v1", pruned=True), DatasetFacts(2, "/d/v2")]
    got = plan([], jobs, datasets, latest=None, previous=None, champion_job=None,
               rules=Rules(keep_versions=1, job_artifacts_age=timedelta(days=1), keep_datasets=1), now=NOW)
    assert got.empty(), got
