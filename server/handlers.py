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
