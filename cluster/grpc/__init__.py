"""kvferry's gRPC surface: the proto, its generated modules and the adapter over the FrontDoor.

``kvferry.proto`` is the API; ``kvferry_pb2*.py`` are generated from it (``python -m
cluster.grpc.codegen``; a test fails when they drift); :mod:`cluster.grpc.adapter`
translates its messages to the shared request path and renders answers and errors.
"""
