"""Exponential backoff (pure): how long to wait before the next try after a run of failures.

One formula for both retry loops: a failed training run (``training.retry_backoff``, capped at a day) and a pending
Ollama registration (``ollama.retry_backoff``, capped at six hours).
"""

from __future__ import annotations


def retry_delay(base_s: float, attempts: int, cap_s: float) -> float:
    """Seconds to wait after ``attempts`` consecutive failures: ``base_s`` after the first, doubling after each
    further one, never more than ``cap_s``."""
    return min(base_s * 2.0 ** (attempts - 1), cap_s)
