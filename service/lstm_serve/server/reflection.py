"""Server reflection, answering the well-known file names of gRPC's own services as well.

grpcio's health and reflection packages register their .proto files as
`grpc_health/v1/health.proto` and `grpc_reflection/v1alpha/reflection.proto`, while gRPC
publishes them (and other servers answer them) as `grpc/health/v1/...` and
`grpc/reflection/v1alpha/...`: a client that asks by the published name gets the same file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

SERVICE_NAME = "grpc.reflection.v1alpha.ServerReflection"
ALIASES = {
    "grpc/health/v1/health.proto": "grpc_health/v1/health.proto",
    "grpc/reflection/v1alpha/reflection.proto": "grpc_reflection/v1alpha/reflection.proto",
}


class _Reflection(ReflectionServicer):  # type: ignore[misc]
    def _file_by_filename(self, request: Any, filename: str) -> Any:
        return super()._file_by_filename(request, ALIASES.get(filename, filename))


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _Reflection(tuple(service_names)), server
    )
