"""The cacheaside gRPC server."""
