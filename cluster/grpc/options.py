"""Serve's gRPC proxy options for kvferry: one place for ``kvferry serve``, the RayService and tests.

Serve's proxy options are cluster-wide and fixed when Serve starts (``serve.start`` or a
RayService's ``serveConfigV2``), so whoever starts Serve passes these. The proxy imports
the servicer function only to learn the service's methods (it routes each call to the
application's ingress deployment, to the method of the same name); reflection lets
``grpcurl`` and ``grpcui`` discover the API without the proto.
"""

from __future__ import annotations

from typing import Any

#: The generated function that registers kvferry.v1.Inference on a gRPC server.
SERVICER_FUNCTION = "cluster.grpc.kvferry_pb2_grpc.add_InferenceServicer_to_server"
SERVICE_NAME = "kvferry.v1.Inference"


def grpc_options(port: int) -> dict[str, Any] | None:
    """Serve's ``grpc_options`` (``gRPCOptionsSchema`` shape) for ``port``; None when 0 (off)."""
    if port == 0:
        return None
    return {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION], "enable_reflection": True}
