"""Stage: build (or find) the dataset version of the eligible conversations, and check training can run on it."""

from __future__ import annotations

from daemon.cycle.context import Cycle, Outcome
from daemon.dataset import builder
from daemon.settings import Settings


def training_configured(settings: Settings) -> str | None:
    """Why training cannot run with this config, or None when it can."""
    if not settings.training.base_model:
        return "training not configured: set training.base_model (a local model folder) to train"
    return None


def run(cycle: Cycle) -> bool:
    """True when a dataset version is ready for training (``cycle.dataset_path`` set)."""
    settings, result = cycle.settings, cycle.result
    cycle.step("building dataset", "from the eligible conversations")
    with cycle.timed("dataset"):
        try:
            built = builder.build(cycle.state, settings.dataset, str(settings.store.root))
        except builder.DatasetError as exc:
            result.end(Outcome.NO_DATA, str(exc))
            return False
    result.dataset_version, result.dataset_created = built.version, built.created
    result.outcome = Outcome.DATASET
    why_not = training_configured(settings)
    if why_not:
        result.end(Outcome.NOT_CONFIGURED, f"dataset v{built.version} ready; {why_not}")
        return False
    if built.version is None or built.path is None:  # build() raises rather than return no version
        raise builder.DatasetError("the dataset build returned no version")
    cycle.dataset_path = built.path
    return True
