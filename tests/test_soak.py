"""The soak's two-minute variant (`pytest -m soak`): the same chaos and checks as `make soak`."""

from __future__ import annotations

import pytest

from benchmarks import soak


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_two_minutes_of_chaos_fail_no_read_and_serve_no_stale_value() -> None:
    report = await soak.main(["--minutes", "2"])
    assert report["checks"] == dict.fromkeys(report["checks"], True), report
