"""The one backoff formula: doubling from the base after each failure, capped."""

from __future__ import annotations

import pytest

from daemon.train.backoff import retry_delay


@pytest.mark.parametrize(("attempts", "expected"), [(1, 30.0), (2, 60.0), (3, 120.0), (6, 960.0)])
def test_doubles_after_each_failure(attempts: int, expected: float) -> None:
    assert retry_delay(30.0, attempts, 86400.0) == expected


def test_never_more_than_the_cap() -> None:
    assert retry_delay(30.0, 13, 86400.0) == 86400.0
    assert retry_delay(60.0, 40, 6 * 3600.0) == 6 * 3600.0
    assert retry_delay(30.0, 12, 86400.0) == 61440.0  # the last step under the cap is not clipped


def test_the_cap_can_be_below_the_base() -> None:
    assert retry_delay(10.0, 1, 5.0) == 5.0
