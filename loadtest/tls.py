"""TLS for `--tls`: a throwaway self-signed certificate and the client's context.

Layer 5 of docs/architecture.md. The certificate is made by the `openssl` command (the
standard library cannot make one), for `localhost` and 127.0.0.1, valid two days,
in a temporary directory that lives as long as the run. Clients trust exactly it.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

#: The name clients check the server's certificate for (any 127.0.0.0/8 address serves).
SERVER_NAME = "localhost"


class CertificateError(RuntimeError):
    """No certificate could be made (no openssl command, or it failed)."""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write `cert.pem` and `key.pem` (P-256, self-signed) into `directory`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError("--tls needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        openssl,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "2", "-subj", f"/CN={SERVER_NAME}"),
        *("-addext", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1"),
        *("-keyout", str(key), "-out", str(cert)),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CertificateError(f"openssl could not make a certificate: {exc}") from None
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only `cert` and checks the name SERVER_NAME."""
    return ssl.create_default_context(cafile=str(cert))
