"""The Enjent supervisor: one uvloop worker per core, a ZeroMQ broker, signals.

Supervisor layer (layer 4 of docs/architecture.md). This folder is installed as the
package ``enjent_supervisor`` (never ``supervisor``, the name of
supervisord's package). :func:`run_cluster` is what
``WebSocketServer.run(workers=N)`` and the ``enjent`` command call.

Exit codes of the supervisor (and of ``enjent run``):

====  ==========================================================
0     stopped by SIGTERM/SIGINT after a graceful stop
1     an unexpected error in the supervisor
2     usage error (bad option, bad ``MODULE:ATTR``)
3     a worker could not boot (e.g. the address is in use)
4     the application could not be loaded (import error, ...)
====  ==========================================================
"""

from __future__ import annotations

from .arbiter import APP_LOAD_ERROR, USAGE_ERROR, WORKER_BOOT_ERROR, Arbiter, run_cluster

__all__ = ["APP_LOAD_ERROR", "USAGE_ERROR", "WORKER_BOOT_ERROR", "Arbiter", "run_cluster"]
