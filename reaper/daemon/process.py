"""`pg-reaper run`: the long-running service.

Signal handlers only set flags and wake the main loop; the main loop acts (reload, stop,
watchdog). A reload builds and validates the whole new configuration before swapping it in.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from reaper import __version__
from reaper.daemon.http import HttpServer
from reaper.daemon.notify import Notifier
from reaper.daemon.scheduler import Scheduler
from reaper.observe.audit import AuditSink
from reaper.observe.log import configure, get_logger
from reaper.observe.metrics import Metrics
from reaper.observe.notifications import Notifications
from reaper.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path
    from types import FrameType

__all__ = ["Daemon"]

# SIGTERM to exit: the cycles in flight get this long to finish, well inside systemd's and
# Kubernetes' grace periods (and the 10 s the design promises).
_STOP_TIMEOUT = 8.0
# The audit table's writer then gets what is left of 9.5 s, at most 2 s, to write the rows it
# holds; it gets 2 s as well when a reload replaces it.
_AUDIT_FLUSH_TIMEOUT = 2.0
_SHUTDOWN_BUDGET = 9.5
# [notify]: the messages still pending at SIGTERM are sent meanwhile, in as long at most.
_NOTIFY_FLUSH_TIMEOUT = 2.0
# With [reaper] watch_config, how often the config file is read to see whether it changed (a
# mounted Kubernetes ConfigMap is updated in place, and nobody sends SIGHUP).
WATCH_INTERVAL = 5.0


# glibc gives a thread that contends for malloc an arena of its own, up to eight per core, and
# keeps what each arena once held: a daemon with a thread per busy server (hundreds, in a fleet
# on a loaded machine) grows by megabytes of half-empty heaps. Two arenas, as the environment
# variable MALLOC_ARENA_MAX=2 would set, are plenty for threads that mostly wait on sockets.
_M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
_MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas for the threads started from now on, unless the operator set
    MALLOC_ARENA_MAX; nothing elsewhere than glibc (musl, macOS have no such parameter)."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, _MALLOC_ARENAS)


def _fingerprint(path: Path) -> str | None:
    """What the config file holds now (None: it cannot be read right now, as for a moment while
    a ConfigMap's files are swapped)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Daemon:
    def __init__(self, *, config_path: Path, settings: Settings, force_dry_run: bool) -> None:
        _limit_malloc_arenas()  # before any thread of the daemon starts
        self._path = config_path
        self._force_dry_run = force_dry_run
        self._settings = settings
        self._metrics = Metrics()
        self._audit = AuditSink(metrics=self._metrics)
        self._notifications = Notifications(metrics=self._metrics)
        self._notifier = Notifier()
        self._scheduler = Scheduler(
            settings, metrics=self._metrics, audit=self._audit, notifications=self._notifications
        )
        self._wake = threading.Event()
        self._reload_requested = False
        self._stop_requested: str | None = None
        self._log = get_logger()
        self._http: HttpServer | None = None
        # The config file as last loaded (or tried): a change to it reloads, as SIGHUP does.
        self._loaded = _fingerprint(config_path)

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 on a clean stop."""
        self._metrics.config_reload_ok.set(1)
        # First, on the audit writer's own connection: a table that cannot be written stops the
        # daemon now (AuditTableUnusable), not found out by rows dropped later.
        self._audit.start(self._settings, check=True)
        listen = self._settings.metrics.listen
        if listen:
            try:
                self._http = HttpServer(
                    listen=listen,
                    registry=self._metrics.registry,
                    healthy=lambda: self._scheduler.running,
                    ready=lambda: self._scheduler.running and self._scheduler.ready,
                )
            except OSError:  # the listener could not bind: pg-reaper exits (cli.py says why)
                self._audit.stop(timeout=0)
                raise
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self._notifications.start(self._settings)
        self._scheduler.start()
        if self._http is not None:
            self._http.start()
        self._log.info(
            "daemon_started",
            version=__version__,
            servers=[s.name for s in self._settings.servers],
            dry_run=self._settings.reaper.dry_run,
            metrics=f"http://{listen}/metrics" if listen else None,
        )
        self._notifier.ready()
        self._loop()
        self._shutdown()
        return 0

    def stop(self, reason: str = "requested") -> None:
        """Ask the main loop to stop, as SIGTERM does (safe from any thread)."""
        self._stop_requested = reason
        self._wake.set()

    @property
    def metrics_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = signal.Signals(signum).name
        self._wake.set()

    def _loop(self) -> None:
        watchdog = self._notifier.watchdog_interval
        next_ping = time.monotonic()
        next_look = time.monotonic() + WATCH_INTERVAL
        while self._stop_requested is None:
            due = [next_look] if self._settings.reaper.watch_config else []
            if watchdog:
                due.append(next_ping)
            self._wake.wait(max(0.0, min(due) - time.monotonic()) if due else None)
            self._wake.clear()
            if self._stop_requested is not None:
                break
            if self._settings.reaper.watch_config and time.monotonic() >= next_look:
                next_look = time.monotonic() + WATCH_INTERVAL
                self._reload_requested |= self._changed()
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            if watchdog and time.monotonic() >= next_ping:
                if self._scheduler.running:
                    self._notifier.watchdog()
                next_ping = time.monotonic() + watchdog

    def _changed(self) -> bool:
        """Whether the config file holds something else than what was last loaded (or tried:
        a broken edit is reported once, not every WATCH_INTERVAL)."""
        now = _fingerprint(self._path)
        if now is None or now == self._loaded:
            return False
        self._log.info("config_changed", path=str(self._path))
        return True

    def _reload(self) -> None:
        self._notifier.reloading()
        self._loaded = _fingerprint(self._path)
        self._log.info("config_reloading", path=str(self._path))
        try:
            settings = load_settings(self._path)
        except ConfigError as exc:
            self._metrics.config_reload_ok.set(0)
            self._log.error(
                "config_reload_failed",
                path=str(self._path),
                problems=list(exc.problems),
                kept="the running configuration",
            )
        else:
            if self._force_dry_run:
                settings = settings.with_dry_run()
            if settings.metrics.listen != self._settings.metrics.listen:
                self._log.warning(
                    "config_reload_partial",
                    detail="metrics.listen changes take effect at the next restart",
                )
            configure(settings.log)
            self._audit.reconfigure(settings, timeout=_AUDIT_FLUSH_TIMEOUT)
            self._notifications.reconfigure(settings)
            self._scheduler.apply(settings)
            self._settings = settings
            self._metrics.config_reload_ok.set(1)
            self._log.info(
                "config_reloaded",
                servers=[s.name for s in settings.servers],
                policies=[p.name for p in settings.policies],
                dry_run=settings.reaper.dry_run,
            )
        self._notifier.ready()

    def _shutdown(self) -> None:
        self._notifier.stopping()
        self._log.info("daemon_stopping", signal=self._stop_requested)
        started = time.monotonic()
        abandoned = self._scheduler.stop(timeout=_STOP_TIMEOUT)
        self._notifications.drain()  # sends while the audit rows are written
        flushed_by = time.monotonic() + _NOTIFY_FLUSH_TIMEOUT
        left = _SHUTDOWN_BUDGET - (time.monotonic() - started)
        self._audit.stop(timeout=max(0.0, min(_AUDIT_FLUSH_TIMEOUT, left)))
        left = min(flushed_by, started + _SHUTDOWN_BUDGET) - time.monotonic()
        self._notifications.stop(timeout=max(0.0, left))
        if self._http is not None:
            self._http.stop()
        self._log.info("daemon_stopped")
        if abandoned:
            # A job blocked on a server that stopped answering would hold the interpreter's
            # exit (it joins the pool's threads) for as long as the server stays stopped.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
