"""The ``enjent`` command line: ``enjent run MODULE:ATTR``, ``enjent publish``.

Supervisor layer. Every option can also come from an ``ENJENT_*``
environment variable; the command line wins over the environment, and both
win over the values the app gives ``WebSocketServer(...)``. ``ATTR`` names
a ``WebSocketServer`` or a function that returns one. With ``--workers 1``
the app runs in this process; with more, under the supervisor, and each
worker imports the module afresh (so SIGHUP picks up new code).
``python -m enjent`` and ``python -m enjent_supervisor`` are this command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import ssl
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .arbiter import APP_LOAD_ERROR, USAGE_ERROR, WORKER_BOOT_ERROR, Arbiter
from .httpapi import ApiSettings, read_api_key
from .publishing import add_publish_parser, publish_main

logger = logging.getLogger("enjent.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")


#: The value of an override that neither the command line nor the environment gave.
NOT_GIVEN: Any = type("NotGiven", (), {"__repr__": lambda self: "NOT_GIVEN"})()


class SettingError(ValueError):
    """An option or ``ENJENT_*`` value that cannot be used (a usage error, exit 2)."""


@dataclass(frozen=True)
class Setting:
    """One ``enjent run`` option: its flag, environment variable and conversion."""

    dest: str
    flags: tuple[str, ...]
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    metavar: str | None = None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number of seconds >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _compression(text: str) -> str | None:
    if text == "deflate":
        return "deflate"
    if text == "none":
        return None
    raise ValueError("must be deflate or none")


def _path_or_off(text: str) -> str | None:
    if text in ("", "none", "off"):
        return None
    if not text.startswith("/"):
        raise ValueError("must start with '/' (or be 'none' to turn it off)")
    return text


def _bus(text: str) -> Any:
    from enjent.cluster.natsbus import parse_bus

    return parse_bus(text)


def _api_address(text: str) -> tuple[str, int]:
    from .httpapi import parse_api_address

    return parse_api_address(text)


def _address_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


#: The options of ``enjent run`` besides MODULE:ATTR, in ``--help`` order.
SETTINGS: tuple[Setting, ...] = (
    Setting("host", ("--host",), "address to listen on (default 127.0.0.1)", str, "127.0.0.1"),
    Setting("port", ("--port",), "port to listen on (default 13003)", _port, 13003),
    Setting(
        "workers",
        ("--workers",),
        "worker processes (default: the number of CPUs; 1: serve in this process, no fork)",
        _positive_int,
        os.cpu_count() or 1,
    ),
    Setting(
        "log_level",
        ("--log-level",),
        f"one of {', '.join(LOG_LEVELS)} (default info)",
        _log_level,
        "INFO",
        "LEVEL",
    ),
    Setting(
        "app_dir",
        ("--app-dir",),
        "directory put first on sys.path to import the app (default: the current one)",
        str,
        ".",
    ),
    Setting(
        "ssl_certfile",
        ("--ssl-certfile",),
        "serve wss:// with this PEM certificate chain",
        str,
        None,
        "FILE",
    ),
    Setting(
        "ssl_keyfile",
        ("--ssl-keyfile",),
        "the certificate's private key, if not in the certfile",
        str,
        None,
        "FILE",
    ),
    Setting(
        "runtime_dir",
        ("--runtime-dir",),
        "where the supervisor makes the private "
        "directory of the bus's ipc:// sockets (default: the system's temporary directory)",
        str,
        None,
        "DIR",
    ),
    Setting(
        "bus",
        ("--bus",),
        "zeromq (the embedded broker, one host; the default) or nats://HOST:PORT[,...]: "
        "join the workers of every host over NATS (ENJENT_NATS_TOKEN, _USER, _PASSWORD, "
        "_CREDS, _TLS_CA, _TLS_CERT, _TLS_KEY for its credentials)",
        _bus,
        None,
        "URLS",
    ),
    Setting(
        "api",
        ("--api",),
        "serve the HTTP publish API on HOST:PORT, a listener of its own (off by default; "
        "keep it internal); every request needs Authorization: Bearer with the key from "
        "ENJENT_API_KEY or --api-key-file",
        _api_address,
        None,
        "HOST:PORT",
    ),
    Setting(
        "api_key_file",
        ("--api-key-file",),
        "a file holding the publish API's key (instead of ENJENT_API_KEY)",
        str,
        None,
        "FILE",
    ),
    Setting(
        "worker_timeout",
        ("--worker-timeout",),
        "seconds a worker may go without a heartbeat before the supervisor kills and "
        "replaces it (default 30)",
        _positive_seconds,
        30.0,
        "SECONDS",
    ),
    Setting(
        "boot_timeout",
        ("--boot-timeout",),
        "seconds a worker may take to import the app and listen before the supervisor "
        "gives up (default 30; a worker waits at most 1 s for NATS, then serves without it)",
        _positive_seconds,
        30.0,
        "SECONDS",
    ),
    Setting(
        "drain_timeout",
        ("--drain-timeout",),
        "on a reload (SIGHUP) or one worker fewer (SIGTTOU), seconds an old worker keeps "
        "its clients: none closed in the first fifth, then each closed with 1012 at its own "
        "moment over the rest (default 30; 0 closes them all at once)",
        _seconds,
        30.0,
        "SECONDS",
    ),
    Setting(
        "health_detail",
        ("--health-detail",),
        "the health path also shows each worker's pid, generation, bus and error counters "
        "(--no-health-detail: status and client count only, the default); for internal "
        "networks",
        _flag,
        NOT_GIVEN,
    ),
    Setting(
        "access_log",
        ("--access-log",),
        "log one line per handshake on the enjent.access "
        "logger (--no-access-log: off, the default)",
        _flag,
        NOT_GIVEN,
    ),
    Setting(
        "trusted_proxies",
        ("--trusted-proxies",),
        "comma-separated addresses or networks "
        "whose X-Forwarded-For / X-Real-Ip is believed (e.g. 127.0.0.1)",
        _address_list,
        NOT_GIVEN,
        "LIST",
    ),
    Setting(
        "max_message_size",
        ("--max-message-size",),
        "largest message accepted, in bytes after decompression (close 1009 above it)",
        _positive_int,
        NOT_GIVEN,
        "BYTES",
    ),
    Setting(
        "ping_interval",
        ("--ping-interval",),
        "keepalive ping after this many idle seconds; 0 turns keepalive off",
        _seconds,
        NOT_GIVEN,
        "SECONDS",
    ),
    Setting(
        "ping_timeout",
        ("--ping-timeout",),
        "close 1011 when no pong comes within this many seconds",
        _seconds,
        NOT_GIVEN,
        "SECONDS",
    ),
    Setting(
        "compression",
        ("--compression",),
        "permessage-deflate: deflate or none",
        _compression,
        NOT_GIVEN,
        "{deflate,none}",
    ),
    Setting(
        "health_path",
        ("--health-path",),
        "path of the JSON health answer; none turns it off",
        _path_or_off,
        NOT_GIVEN,
        "PATH",
    ),
    Setting(
        "metrics_path",
        ("--metrics-path",),
        "path of the Prometheus metrics; none turns it off",
        _path_or_off,
        NOT_GIVEN,
        "PATH",
    ),
)

#: Settings that override the app's WebSocketServer options when given.
SERVER_OVERRIDES = (
    "access_log",
    "health_detail",
    "trusted_proxies",
    "max_message_size",
    "ping_interval",
    "ping_timeout",
    "compression",
    "health_path",
    "metrics_path",
)


def _env_name(setting: Setting) -> str:
    return "ENJENT_" + setting.dest.upper()


class CommandParser(argparse.ArgumentParser):
    """The ``enjent`` parser; :attr:`run` and :attr:`publish` are its subcommands' parsers."""

    run: argparse.ArgumentParser
    publish: argparse.ArgumentParser


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="enjent",
        description="Enjent WebSocket server: run an app on one process or one worker per core.",
        epilog="Exit codes: 0 stopped by a signal, 1 unexpected error, 2 usage error, "
        "3 a worker could not boot (e.g. the address is in use), 4 the app could not be loaded.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve an app",
        description="Serve the WebSocketServer named by MODULE:ATTR. Every option also comes "
        "from the environment variable named after it (ENJENT_APP, ENJENT_HOST, ENJENT_PORT, "
        "ENJENT_WORKERS, ENJENT_LOG_LEVEL, ENJENT_APP_DIR, ENJENT_MAX_MESSAGE_SIZE, ...); the "
        "command line wins over the environment, and both over the app's own values.",
    )
    run.add_argument(
        "app",
        nargs="?",
        default=None,
        metavar="MODULE:ATTR",
        help="ATTR a WebSocketServer or a function returning one (ENJENT_APP)",
    )
    parser.run = run
    add_publish_parser(commands)
    parser.publish = commands.choices["publish"]
    for setting in SETTINGS:
        text = f"{setting.help} ({_env_name(setting)})"
        if setting.convert is _flag:
            run.add_argument(
                setting.flags[0],
                dest=setting.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
            continue
        run.add_argument(
            *setting.flags, dest=setting.dest, default=None, metavar=setting.metavar, help=text
        )
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting's value: the command line, else ``ENJENT_*``, else the default."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.dest)
        source = f"{setting.flags[0]}"
        if raw is None:
            env = os.environ.get(_env_name(setting))
            if env is None:
                values[setting.dest] = setting.default
                continue
            raw, source = env, _env_name(setting)
        if isinstance(raw, bool):  # --access-log / --no-access-log
            values[setting.dest] = raw
            continue
        try:
            values[setting.dest] = setting.convert(raw)
        except ValueError as exc:
            detail = str(exc)
            if "invalid literal" in detail or "could not convert" in detail:  # int() / float()
                detail = "must be a number"
            raise SettingError(f"{source} {detail}, got {raw!r}") from None
    return values


def server_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The WebSocketServer options the command line or environment set."""
    overrides: dict[str, Any] = {}
    for name in SERVER_OVERRIDES:
        value = values[name]
        if value is NOT_GIVEN:
            continue
        if name == "ping_interval" and value == 0:
            value = None
        overrides[name] = value
    return overrides


def _ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server TLS context for native wss://, or ``None`` without a certificate."""
    if certfile is None:
        if keyfile is not None:
            raise SettingError("--ssl-keyfile needs --ssl-certfile")
        return None
    for label, path in (("certificate", certfile), ("key", keyfile)):
        if path is not None and not os.path.isfile(path):
            raise SettingError(f"the TLS {label} file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = certfile if keyfile is None else f"{certfile} with the key {keyfile}"
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise SettingError(f"cannot use the TLS certificate {files}: {reason}") from None
    return context


class AppSpecError(ValueError):
    """``MODULE:ATTR`` is malformed (a usage error, unlike errors of the app's import)."""


def _resolve(spec: str, *, fresh: bool) -> object:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute or " " in spec:
        raise AppSpecError(f"the app must be MODULE:ATTR, got {spec!r}")
    if fresh:
        sys.modules.pop(module_name, None)
    from enjent.server import importing_app

    with importing_app(spec):
        module = importlib.import_module(module_name)
    value: object = module
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def make_loader(
    spec: str, *, fresh: bool, overrides: dict[str, Any] | None = None
) -> Callable[[], object]:
    """A function that imports ``spec`` and returns its WebSocketServer, overrides applied."""
    from enjent import WebSocketServer

    def load() -> WebSocketServer:
        value = _resolve(spec, fresh=fresh)
        if not isinstance(value, WebSocketServer) and callable(value):
            value = value()
        if not isinstance(value, WebSocketServer):
            raise TypeError(f"{spec} is {type(value).__name__}, not a WebSocketServer")
        if overrides:
            value.configure(**overrides)
        return value

    return load


def describe_app_error(exc: BaseException) -> str:
    """The traceback of an app's failure, without the frames of the import machinery."""
    machinery = os.path.dirname(importlib.__file__) + os.sep
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(("<frozen importlib", machinery))
        and frame.filename != __file__
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines).rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    top = build_parser()
    args, unknown = top.parse_known_args(argv)
    if args.version:
        from enjent import __version__

        print(f"enjent {__version__}")
        return 0
    if args.command == "publish":
        if unknown:
            top.publish.error(f"unrecognized arguments: {' '.join(unknown)}")
        return publish_main(args, top.publish)
    if args.command != "run":
        if unknown:
            top.error(f"unrecognized arguments: {' '.join(unknown)}")
        top.print_help()
        return USAGE_ERROR
    # usage errors of `enjent run` print run's usage, not the top level's
    parser = top.run
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        values = resolve_settings(args)
        ssl_context = _ssl_context(values["ssl_certfile"], values["ssl_keyfile"])
    except SettingError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=values["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if values["access_log"] is True:
        logging.getLogger("enjent.access").setLevel(logging.INFO)
    app = args.app or os.environ.get("ENJENT_APP")
    if not app:
        parser.error("run needs MODULE:ATTR (or ENJENT_APP)")
    overrides = server_overrides(values)
    sys.path.insert(0, os.path.abspath(values["app_dir"]))
    from enjent import WebSocketServerError
    from enjent.server import AppServesOnImport

    try:
        server: Any = make_loader(app, fresh=False)()
    except AppSpecError as exc:  # a ValueError raised by the app's import is exit code 4
        parser.error(str(exc))
    except AppServesOnImport as exc:
        logger.error("%s", exc)
        return APP_LOAD_ERROR
    except Exception as exc:
        logger.error(
            "cannot load the app %s: %s: %s\n%s",
            app,
            type(exc).__name__,
            exc,
            describe_app_error(exc),
        )
        return APP_LOAD_ERROR
    try:
        server.configure(**overrides)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    api = None
    if values["api"] is not None:
        api_host, api_port = values["api"]
        if api_port == values["port"]:
            parser.error("--api needs a port of its own, never the WebSocket port")
        try:
            key = read_api_key(values["api_key_file"])
        except ValueError as exc:
            parser.error(str(exc))
        api = ApiSettings(api_host, api_port, key, max_message_size=server.max_message_size)
    if values["workers"] == 1 and values["bus"] is None and api is None:
        try:
            server.run(values["host"], values["port"], ssl=ssl_context)
        except WebSocketServerError as exc:
            logger.error("%s", exc)
            return WORKER_BOOT_ERROR
        return 0
    arbiter = Arbiter(
        make_loader(app, fresh=True, overrides=overrides),  # type: ignore[arg-type]
        values["host"],
        values["port"],
        workers=values["workers"],
        ssl=ssl_context,
        close_timeout=server.close_timeout,
        runtime_dir=values["runtime_dir"],
        worker_timeout=values["worker_timeout"],
        bus=values["bus"],
        boot_timeout=values["boot_timeout"],
        drain_timeout=values["drain_timeout"],
        api=api,
        address_limits=server.options.handshake.address_limits is not None,
        history=server.hub.history,
    )
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
