"""The application's handlers: registered here, and called from here only.

Server layer (layer 2 of docs/architecture.md). :class:`Handlers` holds the
``on_connect`` / ``on_message`` / ``on_disconnect`` / ``on_error`` /
``on_control_frame`` lists and is the one place that calls them: a plain
function is called, an ``async def`` one is run as a task, and an exception
is logged, counted and passed to ``on_error`` (never to the connection).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Handler", "Handlers"]

logger = logging.getLogger("enjent.server")

Handler = Callable[..., Any]


class Handlers:
    """Every handler of one server, and the tasks its async handlers run."""

    __slots__ = (
        "connect",
        "control",
        "disconnect",
        "error",
        "message",
        "single_message",
        "stats",
        "tasks",
    )

    def __init__(self, stats: dict[str, int]) -> None:
        self.connect: list[Handler] = []
        self.message: list[Handler] = []
        self.disconnect: list[Handler] = []
        self.error: list[Handler] = []
        self.control: list[Handler] = []
        #: The only message handler when it is a plain function: connections
        #: call it directly (the hot path), else ``None``.
        self.single_message: Handler | None = None
        self.stats = stats
        self.tasks: set[asyncio.Task[Any]] = set()

    def add_message_handler(self, handler: Handler) -> None:
        self.message.append(handler)
        only = self.message[0] if len(self.message) == 1 else None
        self.single_message = (
            only if only is not None and not inspect.iscoroutinefunction(only) else None
        )

    # ----------------------------------------------------------- dispatch

    def call(self, handlers: list[Handler], client: Any, *args: Any) -> None:
        """Call each handler with ``args``; errors and coroutines are handled here."""
        for handler in handlers:
            try:
                result = handler(*args)
            except Exception as exc:
                self.report_error(client, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                self.spawn(result, client)

    def connected(self, client: Any) -> None:
        if self.connect:
            self.call(self.connect, client, client)

    def received(self, client: Any, message: str | bytes) -> None:
        """A message for the handlers (the connection calls ``single_message`` itself)."""
        self.call(self.message, client, client, message)

    def control_frame(self, client: Any, event: Any) -> None:
        if self.control:
            self.call(self.control, client, client, event)

    def disconnected(self, client: Any, code: int, reason: str) -> None:
        if self.disconnect:
            self.call(self.disconnect, client, client, code, reason)

    def spawn(self, awaitable: Awaitable[Any], client: Any, *, report: bool = True) -> None:
        """Run what an async handler returned as a task, its errors reported."""

        async def run() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if report:
                    self.report_error(client, exc)
                else:  # a failing async on_error must not call on_error again, forever
                    logger.error("error in an on_error handler", exc_info=exc)

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def report_error(self, client: Any, exc: BaseException) -> None:
        """An exception raised by a handler: logged, counted, given to ``on_error``."""
        self.stats["handler_errors"] += 1
        logger.error("error in a handler for %s", client, exc_info=exc)
        for handler in self.error:
            try:
                result = handler(client, exc)
                if result is not None and inspect.isawaitable(result):
                    self.spawn(result, None, report=False)
            except Exception:
                logger.exception("error in an on_error handler")

    async def wait_tasks(self, timeout: float) -> None:
        """Wait (bounded) for the handlers' tasks, then cancel the rest."""
        current = asyncio.current_task()  # a handler may await stop(): never wait on itself
        tasks = [task for task in self.tasks if task is not current]
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=timeout)
            for task in still_running:
                task.cancel()
