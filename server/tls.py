"""TLS and mutual TLS for the gRPC port, from certificate paths in the settings."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.config import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured, else None (plaintext).

    With CACHEASIDE_TLS_CLIENT_CA_FILE set, clients must present a certificate that CA signed (mTLS).
    """
    cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise ValueError("CACHEASIDE_TLS_CLIENT_CA_FILE needs CACHEASIDE_TLS_CERT_FILE and _KEY_FILE")
        return None
    if not (cert and key):
        raise ValueError("set both CACHEASIDE_TLS_CERT_FILE and CACHEASIDE_TLS_KEY_FILE, or neither")
    return grpc.ssl_server_credentials(
        [(_read(key, "CACHEASIDE_TLS_KEY_FILE"), _read(cert, "CACHEASIDE_TLS_CERT_FILE"))],
        root_certificates=_read(client_ca, "CACHEASIDE_TLS_CLIENT_CA_FILE") if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}={path!r} cannot be read: {exc.strerror}") from exc
