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
_ANSWER_FIRST = "answer_first"


def answering_now(
    behavior: Callable[..., Any], answer_now: AnswerNow, *, answer_first: AnswerNow | None = None
) -> Callable[..., Any]:
    """behavior, marked with the answer it can give at once: the guard asks `answer_first` before
    anything else where it can (no token to check, no caller's id to return), and `answer_now` after
    those steps otherwise (guard.py).

    answer_first: the same answer for a call nothing has touched yet, so with no trailing metadata:
    it may set its own without reading and extending what is there. answer_now where not given.
    """
    setattr(behavior, _ANSWER_NOW, answer_now)
    setattr(behavior, _ANSWER_FIRST, answer_now if answer_first is None else answer_first)
    return behavior


def answer_now_of(behavior: Callable[..., Any], *, first: bool = False) -> AnswerNow | None:
    """What `answering_now` marked behavior with (its answer_first, asked `first`), or None."""
    found: AnswerNow | None = getattr(behavior, _ANSWER_FIRST if first else _ANSWER_NOW, None)
    return found
