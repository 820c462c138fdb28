"""The ``enjent`` command line: ``enjent run MODULE:ATTR``.

Supervisor layer (layer 4). Every option can also come from an ``ENJENT_*``
environment variable (the command line wins). ``ATTR`` names a
``WebSocketServer`` or a function that returns one. With ``--workers 1``
the app runs in this process; with more, under the supervisor, and each
worker imports the module afresh (so SIGHUP picks up new code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence

from .arbiter import APP_LOAD_ERROR, USAGE_ERROR, Arbiter

logger = logging.getLogger("enjent.cli")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ENJENT_{name}", default)


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        print(f"enjent: error: ENJENT_{name} must be an integer, got {value!r}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enjent",
        description="Enjent WebSocket server: run an app on one process or one worker per core.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve an app",
        description="Serve the WebSocketServer named by MODULE:ATTR. "
        "Options default to ENJENT_APP, ENJENT_HOST, ENJENT_PORT, ENJENT_WORKERS, "
        "ENJENT_LOG_LEVEL and ENJENT_APP_DIR.",
    )
    run.add_argument(
        "app",
        nargs="?",
        default=_env("APP"),
        help="MODULE:ATTR, ATTR a WebSocketServer or a function returning one (ENJENT_APP)",
    )
    run.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="default 127.0.0.1")
    run.add_argument("--port", type=int, default=_env_int("PORT", 13003), help="default 13003")
    run.add_argument(
        "--workers",
        type=int,
        default=_env_int("WORKERS", os.cpu_count() or 1),
        help="worker processes (default: the number of CPUs; 1: no fork)",
    )
    run.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
        help="default INFO",
    )
    run.add_argument(
        "--app-dir",
        default=_env("APP_DIR", "."),
        help="directory put first on sys.path to import the app (default: the current one)",
    )
    run.add_argument(
        "--ssl-certfile",
        default=_env("SSL_CERTFILE"),
        help="serve wss:// with this PEM certificate chain (ENJENT_SSL_CERTFILE)",
    )
    run.add_argument(
        "--ssl-keyfile",
        default=_env("SSL_KEYFILE"),
        help="the certificate's private key, if not in the certfile (ENJENT_SSL_KEYFILE)",
    )
    return parser


def _ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server TLS context for native wss://, or ``None`` without a certificate."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


class AppSpecError(ValueError):
    """``MODULE:ATTR`` is malformed (a usage error, unlike errors of the app's import)."""


def _resolve(spec: str, *, fresh: bool) -> object:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppSpecError(f"the app must be MODULE:ATTR, got {spec!r}")
    if fresh:
        sys.modules.pop(module_name, None)
    module = importlib.import_module(module_name)
    value: object = module
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def make_loader(spec: str, *, fresh: bool) -> Callable[[], object]:
    """A function that imports ``spec`` and returns its WebSocketServer."""
    from enjent import WebSocketServer

    def load() -> WebSocketServer:
        value = _resolve(spec, fresh=fresh)
        if not isinstance(value, WebSocketServer) and callable(value):
            value = value()
        if not isinstance(value, WebSocketServer):
            raise TypeError(f"{spec} is {type(value).__name__}, not a WebSocketServer")
        return value

    return load


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from enjent import __version__

        print(f"enjent {__version__}")
        return 0
    if args.command != "run":
        parser.print_help()
        return USAGE_ERROR
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.app:
        parser.error("run needs MODULE:ATTR (or ENJENT_APP)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    try:
        ssl_context = _ssl_context(args.ssl_certfile, args.ssl_keyfile)
    except (OSError, ValueError, ssl.SSLError) as exc:
        parser.error(f"cannot use the TLS certificate: {exc}")
    sys.path.insert(0, os.path.abspath(args.app_dir))
    try:
        server = make_loader(args.app, fresh=False)()
    except AppSpecError as exc:  # a ValueError raised by the app's import is exit code 4
        parser.error(str(exc))
    except Exception as exc:
        logger.error("cannot load the app %s: %s: %s", args.app, type(exc).__name__, exc)
        return APP_LOAD_ERROR
    if args.workers == 1:
        from enjent import WebSocketServerError

        try:
            server.run(args.host, args.port, ssl=ssl_context)  # type: ignore[attr-defined]
        except WebSocketServerError as exc:
            logger.error("%s", exc)
            return 3
        return 0
    arbiter = Arbiter(
        make_loader(args.app, fresh=True),  # type: ignore[arg-type]
        args.host,
        args.port,
        workers=args.workers,
        ssl=ssl_context,
        close_timeout=server.close_timeout,  # type: ignore[attr-defined]
    )
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
