"""Wrapping a gRPC method handler: a new behaviour for the same kind of call, with the same codecs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in grpc-stubs only


def like(handler: Handler, behavior: Callable[..., Any]) -> Handler:
    """A handler of handler's kind (unary or server-streaming) and (de)serializers that runs behavior."""
    build = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.unary_unary_rpc_method_handler
    )
    return build(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


AnswerNow: TypeAlias = "Callable[[bytes, Any], bytes | None]"
"""A read's answer when it can be given at once, without awaiting anything (a held near-cache answer,
with its metadata set on the context); else None, and the handler proper serves the call."""

_ANSWER_NOW = "answer_now"


def answering_now(behavior: Callable[..., Any], answer_now: AnswerNow) -> Callable[..., Any]:
    """behavior, marked with the answer it can give at once (the guard asks that first: guard.py)."""
    setattr(behavior, _ANSWER_NOW, answer_now)
    return behavior


def answer_now_of(behavior: Callable[..., Any]) -> AnswerNow | None:
    """What `answering_now` marked behavior with, or None."""
    found: AnswerNow | None = getattr(behavior, _ANSWER_NOW, None)
    return found
