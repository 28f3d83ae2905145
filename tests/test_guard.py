"""The guard's routing: which guarded handler serves a call, from the metadata grpc decoded for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest

from server.guard import GuardedService
from server.observability import REQUEST_ID_HEADER
from server.service import CACHE_DEBUG_HEADER as DEBUG
from server.service import SERVICE_NAME as SERVICE


@dataclass(frozen=True)
class _Details:
    """What grpc hands a generic handler: the method's path and the call's metadata."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] | None


def _route(service: GuardedService, method: str, metadata: tuple[tuple[str, str], ...] | None) -> Any:
    """The handler service picks for a call of method with metadata (None: not one of its methods)."""
    return service.service(cast(grpc.HandlerCallDetails, _Details(method, metadata)))


def _service(*, asked_header: str | None = DEBUG) -> GuardedService:
    # Each handler stands for itself: which set served a call is all this test looks at.
    handlers: dict[str, Any] = {
        kind: {"GetPost": f"{kind} GetPost", "Invalidate": f"{kind} Invalidate"}
        for kind in ("making", "reading", "asked")
    }
    return GuardedService(
        SERVICE, handlers["making"], handlers["reading"], asked_header=asked_header, asked=handlers["asked"]
    )


@pytest.mark.parametrize(
    ("metadata", "served_by"),
    [
        (None, "making"),
        ((), "making"),
        ((("user-agent", "grpc-python"),), "making"),
        (((REQUEST_ID_HEADER, "r-1"),), "reading"),
        (((DEBUG, "1"),), "asked"),
        (((DEBUG, "1"), (REQUEST_ID_HEADER, "r-1")), "asked"),
        (((REQUEST_ID_HEADER, "r-1"), (DEBUG, "1")), "asked"),
        (((DEBUG, "1"), (DEBUG, "0")), "asked"),
        ((("user-agent", "x"), (REQUEST_ID_HEADER, "r-1"), ("authorization", "Bearer t")), "reading"),
    ],
)
def test_a_call_is_served_by_the_set_its_metadata_asks_for_in_any_order(
    metadata: tuple[tuple[str, str], ...] | None, served_by: str
) -> None:
    service = _service()
    for rpc in ("GetPost", "Invalidate"):
        assert _route(service, f"/{SERVICE}/{rpc}", metadata) == f"{served_by} {rpc}"


def test_other_services_methods_are_left_to_the_next_handler_whatever_the_metadata() -> None:
    service = _service()
    for metadata in (None, ((DEBUG, "1"),), ((REQUEST_ID_HEADER, "r-1"),)):
        assert _route(service, "/grpc.health.v1.Health/Check", metadata) is None


def test_without_an_asked_header_the_header_is_just_metadata() -> None:
    service = _service(asked_header=None)
    assert _route(service, f"/{SERVICE}/GetPost", ((DEBUG, "1"),)) == "making GetPost"
    assert (
        _route(service, f"/{SERVICE}/GetPost", ((DEBUG, "1"), (REQUEST_ID_HEADER, "r"))) == "reading GetPost"
    )
