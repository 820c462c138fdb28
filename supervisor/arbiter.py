"""The prefork supervisor ("arbiter"): forks workers and the broker, watches them.

Supervisor layer (layer 4 of docs/architecture.md), in the manner of gunicorn's arbiter:
signal handlers only enqueue the signal and wake the main loop; one loop
reaps children, dispatches signals (``handle_term``, ``handle_hup``, ...),
restarts what died and waits, always with a timeout.

- A worker that dies after it booted is restarted at once; the broker tells
  the other workers to purge its clients.
- A worker that dies before it booted (the app does not import, the port is
  taken) stops everything with a clear message: no restart loop.
- SIGTERM/SIGINT: workers get SIGTERM (each sends Close 1001 to its clients
  and stops within ``close_timeout``); stragglers are killed after a margin;
  the runtime directory with the ipc sockets is removed.
- SIGHUP, a reload that keeps clients: a new worker starts beside each old
  one (the app module is re-imported when it was given as ``MODULE:ATTR``);
  once it is ready, the old one *drains* (SIGUSR1): it stops accepting,
  keeps its clients for ``drain_timeout`` seconds (30 by default), and
  closes them with 1012 (Service Restart) spread over that period with
  jitter (none in its first fifth), so that they neither drop at once nor
  all reconnect in the same second. A new worker that fails to boot
  abandons the reload: the old ones keep serving. Every live worker has a
  shard number of its own (the lowest free one), so an old worker and its
  successor never share one on the bus. SIGTTIN / SIGTTOU: one worker more
  / less (the one removed drains too). If the broker dies it is restarted,
  with a backoff (0.1 s doubling up to 10 s) while it keeps dying; the
  workers' ZeroMQ sockets reconnect by themselves. A broker that cannot
  start at all stops the supervisor (exit 3).
- A worker beats through its pipe every second from its event loop; one
  silent for ``worker_timeout`` seconds (hung, or stopped with SIGSTOP) is
  killed and replaced, and the log says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import select
import shutil
import signal
import socket
import ssl as ssl_module
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from enjent.cluster.natsbus import IpcBus, NatsConfig, host_shard_base
from enjent.server.addresses import AddressTable
from enjent.server.history import HistoryRules
from enjent.server.running import tune_allocator

from .httpapi import ApiSettings
from .warmup import fill_allocator_pools, warm_up
from .worker import APP_LOAD_ERROR, DRAIN_SIGNAL, WORKER_BOOT_ERROR, WorkerSpec, worker_main

if TYPE_CHECKING:
    from enjent import WebSocketServer

__all__ = [
    "APP_LOAD_ERROR",
    "BOOT_TIMEOUT",
    "DRAIN_TIMEOUT",
    "USAGE_ERROR",
    "WORKER_BOOT_ERROR",
    "Arbiter",
    "run_cluster",
]

logger = logging.getLogger("enjent.supervisor")
#: sun_path of a Unix socket holds 108 bytes on Linux, the final NUL included
_MAX_IPC_PATH = 107

USAGE_ERROR = 2
_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
#: Seconds a worker may take to bind and report ready (``--boot-timeout``).
BOOT_TIMEOUT = 30.0
#: Seconds a replaced worker keeps its clients before closing them (``--drain-timeout``).
DRAIN_TIMEOUT = 30.0

#: Seconds without a heartbeat before a booted worker is declared hung.
WORKER_TIMEOUT = 30.0
#: Broker restarts: the first delay, the cap, and how long it must live to reset.
BROKER_BACKOFF = (0.1, 10.0, 10.0)
#: Broker deaths before any worker booted that stop the supervisor.
BROKER_START_ATTEMPTS = 3


@dataclasses.dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    #: which of the ``num_workers`` places it fills (0 .. num_workers - 1)
    slot: int
    #: its shard on the bus, unique among live workers; its name in every log line
    shard: int
    pid: int
    ready_fd: int
    started_at: float
    booted: bool = False
    #: told to stop (SIGTERM) or to drain (SIGUSR1): its exit is planned
    retiring: bool = False
    #: a reload started a successor for its slot; it drains once that one is ready
    replaced: bool = False
    #: when it was told to drain (0: not draining)
    draining_since: float = 0.0
    last_heartbeat: float = 0.0
    hung: bool = False
    boot_timed_out: bool = False


class Arbiter:
    """Runs ``workers`` copies of the app on ``host:port`` as one logical server."""

    def __init__(
        self,
        load_app: Callable[[], WebSocketServer],
        host: str,
        port: int,
        *,
        workers: int,
        ssl: ssl_module.SSLContext | None = None,
        close_timeout: float = 5.0,
        runtime_dir: str | None = None,
        worker_timeout: float = WORKER_TIMEOUT,
        bus: NatsConfig | IpcBus | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
        api: ApiSettings | None = None,
        address_limits: bool = False,
        history: HistoryRules | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if not boot_timeout > 0:
            raise ValueError("boot_timeout must be positive")
        if not drain_timeout >= 0:
            raise ValueError("drain_timeout must be >= 0")
        self.boot_timeout = boot_timeout
        self.drain_timeout = drain_timeout
        #: the rooms that keep history (the app's rules at start): the broker's keeper's
        self.history = history
        #: the HTTP publish API's settings (``--api``), served by a process of its own
        self.api = api
        #: the host's counts per client address, shared with every worker (the app
        #: limits addresses: ``address_limits``); made before the first fork
        self.address_table = AddressTable.create() if address_limits else None
        self.api_pid = 0
        self._api_started_at = 0.0
        self._api_restart_at = 0.0
        #: where the private directory of the bus's ipc:// sockets is made
        #: (``None``: the system's temporary directory)
        self.runtime_parent = runtime_dir
        if not worker_timeout > 0:
            raise ValueError("worker_timeout must be positive")
        self.worker_timeout = worker_timeout
        #: the embedded broker's directory when given (``--bus ipc:///DIR``): kept at stop
        self.bus_directory = bus.directory if isinstance(bus, IpcBus) else None
        #: ``None``: the embedded ZeroMQ broker; else every worker connects to NATS
        self.bus = bus if isinstance(bus, NatsConfig) else None
        self._shard_base = 0 if self.bus is None else host_shard_base(self.bus, host, port)
        self._broker_backoff = BROKER_BACKOFF[0]
        self._broker_started_at = 0.0
        self._broker_restart_at = 0.0
        self._broker_failures = 0
        self._broker_was_up = False
        self.load_app = load_app
        self.host = host
        self.port = port
        self.num_workers = workers
        self.ssl = ssl
        self.close_timeout = close_timeout
        self.workers: dict[int, Worker] = {}
        self.broker_pid = 0
        self.broker_control = -1
        self.runtime_dir = ""
        self.publish_endpoint = ""
        self.subscribe_endpoint = ""
        self.exit_code = 0
        self._signal_queue: list[int] = []
        self._wakeup_read = -1
        self._wakeup_write = -1
        self._stopping = False
        self._port_reservation: socket.socket | None = None

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Serve until stopped; return the exit code (see the package docstring)."""
        tune_allocator()  # before any fork: every worker inherits the settings
        try:
            self._reserve_port()
        except OSError as exc:
            logger.error("cannot listen on %s:%s: %s", self.host, self.port, exc.strerror or exc)
            return WORKER_BOOT_ERROR
        if self.api is not None:
            try:
                _probe_port(self.api.host, self.api.port)
            except OSError as exc:
                logger.error(
                    "the publish API cannot listen on %s:%s: %s",
                    self.api.host,
                    self.api.port,
                    exc.strerror or exc,
                )
                return WORKER_BOOT_ERROR
        if self.bus_directory is not None:
            problem = _use_bus_directory(self.bus_directory)
            if problem:
                logger.error("%s", problem)
                return USAGE_ERROR
        try:
            self.runtime_dir = self.bus_directory or tempfile.mkdtemp(
                prefix="enjent-", dir=self.runtime_parent
            )  # 0700
        except OSError as exc:
            logger.error(
                "cannot create the runtime directory in %s: %s",
                self.runtime_parent or tempfile.gettempdir(),
                exc.strerror or exc,
            )
            return WORKER_BOOT_ERROR
        if len(self.runtime_dir) + len("/bus-out") > _MAX_IPC_PATH:
            logger.error(
                "the runtime directory %s is too long for ipc:// sockets (at most %d bytes): "
                "choose a shorter --runtime-dir",
                self.runtime_dir,
                _MAX_IPC_PATH - len("/bus-out"),
            )
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = ""
            return WORKER_BOOT_ERROR
        self.publish_endpoint = f"ipc://{self.runtime_dir}/bus-in"
        self.subscribe_endpoint = f"ipc://{self.runtime_dir}/bus-out"
        self._install_signals()
        # children share the supervisor's memory copy-on-write: run the hot
        # paths once here (shared, not copied per worker), and keep the garbage
        # collector of every child from touching (copying) it
        warm_up()
        gc.collect()
        fill_allocator_pools()
        gc.freeze()
        try:
            if self.bus is None:
                self._spawn_broker()
            if self.api is not None:
                self._spawn_api()
            self._maintain()
            logger.info(
                "supervisor (pid %d): %d workers serving on %s://%s:%d",
                os.getpid(),
                self.num_workers,
                "ws" if self.ssl is None else "wss",
                self.host,
                self.port,
            )
            while not self._stopping:
                self._reap()
                self._dispatch_signals()
                if self._stopping:
                    break
                self._maintain()
                self._wait(0.5)
        except Exception:
            logger.exception("supervisor error")
            self.exit_code = self.exit_code or 1
        finally:
            self._shutdown()
        return self.exit_code

    # ------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup_write, False)
        for signum in _SIGNALS:
            signal.signal(signum, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        """The signal handler: enqueue and wake the loop, nothing else."""
        if len(self._signal_queue) < 16:
            self._signal_queue.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wakeup_write, b"!")

    def _dispatch_signals(self) -> None:
        while self._signal_queue:
            signum = self._signal_queue.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(signum)
            elif signum == signal.SIGHUP:
                self.handle_hup()
            elif signum == signal.SIGTTIN:
                self.handle_ttin()
            elif signum == signal.SIGTTOU:
                self.handle_ttou()
            # SIGCHLD only wakes the loop: _reap runs every iteration

    def handle_term(self, signum: int) -> None:
        logger.info("supervisor: %s, stopping", signal.Signals(signum).name)
        self._stopping = True

    def handle_hup(self) -> None:
        current = [w for w in self.workers.values() if not w.retiring and not w.replaced]
        logger.info(
            "supervisor: SIGHUP, reloading: %d new workers start; each old one drains its "
            "clients over %.0fs once its successor is ready",
            len(current),
            self.drain_timeout,
        )
        for worker in current:
            worker.replaced = True

    def handle_ttin(self) -> None:
        self.num_workers += 1
        logger.info("supervisor: SIGTTIN, now %d workers", self.num_workers)

    def handle_ttou(self) -> None:
        if self.num_workers <= 1:
            logger.info("supervisor: SIGTTOU ignored, one worker is the minimum")
            return
        self.num_workers -= 1
        logger.info("supervisor: SIGTTOU, now %d workers", self.num_workers)
        for worker in list(self.workers.values()):
            if worker.slot >= self.num_workers and not worker.retiring:
                self._drain(worker, "SIGTTOU")

    # ------------------------------------------------------------ children

    def _fork(self, child: Callable[[], int]) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never return into the supervisor's loop
            code = 1
            try:
                for signum in _SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                for fd in (self._wakeup_read, self._wakeup_write):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if self._port_reservation is not None:
                    self._port_reservation.close()
                code = child()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                logger.exception("child process failed")
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def _spawn_broker(self) -> None:
        from .broker import broker_main

        read_fd, write_fd = os.pipe()
        publish, subscribe = self.publish_endpoint, self.subscribe_endpoint

        def child() -> int:
            os.close(write_fd)
            for worker in self.workers.values():
                with contextlib.suppress(OSError):
                    os.close(worker.ready_fd)
            return broker_main(publish, subscribe, read_fd, self.history)

        pid = self._fork(child)
        os.close(read_fd)
        if self.broker_control >= 0:
            with contextlib.suppress(OSError):
                os.close(self.broker_control)
        self.broker_pid = pid
        self.broker_control = write_fd
        self._broker_started_at = time.monotonic()
        logger.info("broker started (pid %d)", pid)

    def _free_shard(self) -> int:
        """The lowest shard number no live worker has (the base of this host added)."""
        taken = {worker.shard for worker in self.workers.values()}
        shard = self._shard_base
        while shard in taken:
            shard += 1
        return shard

    def _spawn_api(self) -> None:
        from .httpapi import api_main

        settings = self.api
        assert settings is not None
        bus: NatsConfig | IpcBus = self.bus or IpcBus(self.runtime_dir)

        def child() -> int:
            with contextlib.suppress(OSError):
                os.close(self.broker_control)
            for worker in self.workers.values():
                with contextlib.suppress(OSError):
                    os.close(worker.ready_fd)
            return api_main(settings, bus)

        self.api_pid = self._fork(child)
        self._api_started_at = time.monotonic()
        logger.info("publish API started (pid %d)", self.api_pid)

    def _api_died(self, pid: int, code: int) -> None:
        """Restart the API a second later; stop everything if it cannot listen at all."""
        self.api_pid = 0
        if code == WORKER_BOOT_ERROR and time.monotonic() - self._api_started_at < 5.0:
            logger.error("the publish API (pid %d) cannot start: stopping", pid)
            self.exit_code = WORKER_BOOT_ERROR
            self._stopping = True
            return
        logger.error("the publish API (pid %d) died (%s); restarting it", pid, _describe(code))
        self._api_restart_at = time.monotonic() + 1.0

    def _spawn_worker(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        parent_pid = os.getpid()
        shard = self._free_shard()
        spec = WorkerSpec(
            shard=shard,
            host=self.host,
            port=self.port,
            publish_endpoint=self.publish_endpoint,
            subscribe_endpoint=self.subscribe_endpoint,
            ready_fd=write_fd,
            parent_pid=parent_pid,
            ssl=self.ssl,
            bus=self.bus,
            drain_timeout=self.drain_timeout,
            address_table=self.address_table,
        )

        def child() -> int:
            os.close(read_fd)
            with contextlib.suppress(OSError):
                os.close(self.broker_control)
            for worker in self.workers.values():
                with contextlib.suppress(OSError):
                    os.close(worker.ready_fd)
            return worker_main(self.load_app, spec)

        pid = self._fork(child)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        now = time.monotonic()
        self.workers[pid] = Worker(slot, shard, pid, read_fd, now, last_heartbeat=now)
        logger.info("worker %d started (pid %d)", shard, pid)

    def _drain(self, worker: Worker, why: str) -> None:
        """Tell ``worker`` to stop accepting and close its clients over ``drain_timeout``."""
        worker.retiring = True
        worker.draining_since = time.monotonic()
        logger.info(
            "worker %d (pid %d) drains (%s): no new connections, its clients closed with 1012 "
            "over %.0fs",
            worker.shard,
            worker.pid,
            why,
            self.drain_timeout,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, DRAIN_SIGNAL)

    def _maintain(self) -> None:
        """Start the missing workers and broker; drain the replaced ones whose successor is up."""
        if self._stopping:
            return
        if self.bus is None and not self.broker_pid and time.monotonic() >= self._broker_restart_at:
            self._spawn_broker()
        if self.api is not None and not self.api_pid and time.monotonic() >= self._api_restart_at:
            self._spawn_api()
        workers = list(self.workers.values())
        current = {w.slot for w in workers if not w.retiring and not w.replaced}
        for slot in range(self.num_workers):
            if slot not in current:
                self._spawn_worker(slot)
        ready = {w.slot for w in workers if w.booted and not w.retiring and not w.replaced}
        for worker in workers:
            if worker.replaced and not worker.retiring and worker.slot in ready:
                self._drain(worker, "reload")
            elif worker.replaced and not worker.retiring and worker.slot >= self.num_workers:
                self._drain(worker, "reload, one worker fewer")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.broker_pid:
                self.broker_pid = 0
                if not self._stopping:
                    self._broker_died(pid, code)
                continue
            if pid == self.api_pid:
                if self._stopping:
                    self.api_pid = 0
                else:
                    self._api_died(pid, code)
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._read_ready(worker)
            with contextlib.suppress(OSError):
                os.close(worker.ready_fd)
            planned = worker.retiring or self._stopping
            self._announce_dead(worker, planned)
            if planned:
                how = "drained and stopped" if worker.draining_since else "stopped"
                logger.info("worker %d (pid %d) %s (%s)", worker.shard, pid, how, _describe(code))
            elif not worker.booted and self._reload_in_progress(worker):
                logger.error(
                    "worker %d (pid %d), started by a reload, failed to boot (%s): the reload "
                    "is abandoned, the old workers keep serving; see the error above",
                    worker.shard,
                    pid,
                    _describe(code),
                )
                self._abandon_reload()
            elif not worker.booted:
                logger.error(
                    "worker %d (pid %d) failed to boot (%s): stopping, see the error above",
                    worker.shard,
                    pid,
                    _describe(code),
                )
                self.exit_code = code if code in (WORKER_BOOT_ERROR, APP_LOAD_ERROR) else 3
                self._stopping = True
            else:
                logger.error(
                    "worker %d (pid %d) died (%s); restarting it",
                    worker.shard,
                    pid,
                    _describe(code),
                )

    def _reload_in_progress(self, worker: Worker) -> bool:
        """Whether a replaced worker still serves the slot of ``worker`` (a reload's new one)."""
        return any(
            w.replaced and not w.retiring and w.slot == worker.slot for w in self.workers.values()
        )

    def _abandon_reload(self) -> None:
        """A reload's new worker failed: keep the old ones, stop the new ones not yet ready."""
        for worker in self.workers.values():
            if worker.replaced and not worker.retiring:
                worker.replaced = False  # serves on as the current worker of its slot
            elif not worker.booted and not worker.retiring:
                worker.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _broker_died(self, pid: int, code: int) -> None:
        """Restart the broker after a backoff that grows while it keeps dying."""
        now = time.monotonic()
        initial, cap, healthy = BROKER_BACKOFF
        if now - self._broker_started_at > healthy:
            self._broker_backoff = initial  # it had lived: start over
            self._broker_was_up = True
        self._broker_failures += 1
        if not self._broker_was_up and self._broker_failures >= BROKER_START_ATTEMPTS:
            logger.error(
                "the bus broker cannot start (%s, %d attempts): stopping; see its error above",
                _describe(code),
                self._broker_failures,
            )
            self.exit_code = WORKER_BOOT_ERROR
            self._stopping = True
            return
        delay = self._broker_backoff
        self._broker_backoff = min(cap, delay * 2)
        self._broker_restart_at = now + delay
        logger.error(
            "broker (pid %d) died (%s); restarting it in %.1fs", pid, _describe(code), delay
        )

    def _announce_dead(self, worker: Worker, planned: bool) -> None:
        if self.broker_control < 0:
            return
        line = b"dead %d %d %d\n" % (worker.shard, worker.pid, planned)
        with contextlib.suppress(OSError):
            os.write(self.broker_control, line)

    def _read_ready(self, worker: Worker) -> None:
        """Read the worker's pipe: "R" once it listens, then a beat a second."""
        try:
            if os.read(worker.ready_fd, 4096):
                worker.last_heartbeat = time.monotonic()
                if not worker.booted:
                    logger.info("worker %d (pid %d) ready", worker.shard, worker.pid)
                worker.booted = True
        except (BlockingIOError, OSError):
            pass

    def _wait(self, timeout: float) -> None:
        fds = [self._wakeup_read] + [w.ready_fd for w in self.workers.values()]
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wakeup_read in readable:
            with contextlib.suppress(OSError):
                while os.read(self._wakeup_read, 512):
                    pass
        now = time.monotonic()
        drain_deadline = self.drain_timeout + self.close_timeout + 5.0
        for worker in list(self.workers.values()):
            self._read_ready(worker)
            if not worker.booted and now - worker.started_at > self.boot_timeout:
                if not worker.boot_timed_out:  # said once; killed until reaped
                    worker.boot_timed_out = True
                    logger.error(
                        "worker %d (pid %d) did not boot within %.0fs (--boot-timeout): killing it",
                        worker.shard,
                        worker.pid,
                        self.boot_timeout,
                    )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            elif worker.draining_since and now - worker.draining_since > drain_deadline:
                if not worker.hung:
                    worker.hung = True
                    logger.error(
                        "worker %d (pid %d) still runs %.0fs after it was told to drain: "
                        "killing it",
                        worker.shard,
                        worker.pid,
                        now - worker.draining_since,
                    )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            elif (
                worker.booted
                and not worker.hung
                and now - worker.last_heartbeat > self.worker_timeout
            ):
                worker.hung = True
                logger.error(
                    "worker %d (pid %d) sent no heartbeat for %.0fs (worker_timeout): "
                    "killing and replacing it",
                    worker.shard,
                    worker.pid,
                    now - worker.last_heartbeat,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    # ------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        self._stopping = True
        for pid in [worker.pid for worker in self.workers.values()] + [self.api_pid]:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.close_timeout + 3.0
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                time.sleep(0.05)
        for worker in list(self.workers.values()):
            logger.warning("worker %d (pid %d) did not stop: killing it", worker.shard, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5.0
        while self.workers and time.monotonic() < kill_deadline:
            self._reap()
            time.sleep(0.02)
        self._reap_or_kill(lambda: self.api_pid, 3.0)  # SIGTERM sent above
        self.api_pid = 0
        if self.broker_control >= 0:
            with contextlib.suppress(OSError):
                os.close(self.broker_control)  # the broker exits at end of file
            self.broker_control = -1
        self._reap_or_kill(lambda: self.broker_pid, 2.0)
        self.broker_pid = 0
        if self.runtime_dir and self.bus_directory is None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._port_reservation is not None:
            self._port_reservation.close()
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self._wakeup_read, self._wakeup_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        logger.info("supervisor stopped (exit code %d)", self.exit_code)

    def _reap_or_kill(self, pid_of: Callable[[], int], seconds: float) -> None:
        """Reap the child ``pid_of()`` names (0: none) within ``seconds``, else SIGKILL it."""
        deadline = time.monotonic() + seconds
        while pid_of() and time.monotonic() < deadline:
            self._reap()
            if pid_of():
                time.sleep(0.02)
        pid = pid_of()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    # ---------------------------------------------------------------- port

    def _reserve_port(self) -> None:
        """Fail early if another process owns the port; pick one for port 0.

        A bind without ``SO_REUSEPORT`` fails if anybody listens there (even
        our own kind: two clusters must not share a port silently). For port
        0, a bound (not listening) ``SO_REUSEPORT`` socket keeps the chosen
        port for the workers.
        """
        if self.port != 0:
            _probe_port(self.host, self.port)
            return
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        reservation = socket.socket(info[0], socket.SOCK_STREAM)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(info[4])
        self.port = reservation.getsockname()[1]
        self._port_reservation = reservation


def _probe_port(host: str, port: int) -> None:
    """Raise ``OSError`` if something listens on ``host:port`` already."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(info[0], socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(info[4])


def _use_bus_directory(directory: str) -> str:
    """Make ``directory`` (mode 0700) or check an existing one; what is wrong, or ``""``.

    Whoever can enter the directory can publish to every client and read
    every presence answer: one that others may enter (group or world bits)
    is refused, not fixed behind the operator's back. A live broker already
    there (another supervisor on the same directory) is refused too.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        return f"cannot use the bus directory {directory}: {exc.strerror or exc}"
    if not stat.S_ISDIR(info.st_mode):
        return f"the bus directory {directory} is not a directory"
    if info.st_mode & 0o077:
        return (
            f"the bus directory {directory} is open to others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): whoever enters it can publish to every "
            f"client; run `chmod 700 {directory}` or choose another"
        )
    if info.st_uid != os.geteuid():
        return f"the bus directory {directory} belongs to another user"
    socket_path = os.path.join(directory, "bus-in")
    if os.path.exists(socket_path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(socket_path)
            except OSError:
                return ""  # a leftover of a stopped broker: bound afresh
        return f"another Enjent supervisor serves the bus directory {directory}"
    return ""


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def run_cluster(
    app: WebSocketServer | Callable[[], WebSocketServer],
    host: str,
    port: int,
    *,
    workers: int,
    ssl: ssl_module.SSLContext | None = None,
    worker_timeout: float = WORKER_TIMEOUT,
    bus: NatsConfig | IpcBus | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> int:
    """Run ``app`` (a server, or a function that builds one) on ``workers`` processes."""
    from enjent import WebSocketServer

    if isinstance(app, WebSocketServer):
        server = app

        def load_app() -> WebSocketServer:
            return server

        close_timeout = server.close_timeout
        address_limits = server.options.handshake.address_limits is not None
        history = server.hub.history
    else:
        load_app = app
        close_timeout = 5.0
        address_limits = False
        history = None
    return Arbiter(
        load_app,
        host,
        port,
        workers=workers,
        ssl=ssl,
        close_timeout=close_timeout,
        worker_timeout=worker_timeout,
        bus=bus,
        boot_timeout=boot_timeout,
        drain_timeout=drain_timeout,
        address_limits=address_limits,
        history=history,
    ).run()
