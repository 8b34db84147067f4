"""Notifications of what was reaped, through apprise ([notify] urls): Slack, Teams, e-mail, a
generic JSON webhook and the rest of apprise's services.

Off the reaping path. After each cycle, the daemon (and `pg-reaper once`) hands the cycle's
report to `Notifications.submit`, which keeps a small summary of it (counts, the oldest victims;
never a query text) in a bounded queue and returns at once: when the queue is full the summary is
dropped and counted. One background thread per process folds the summaries into one pending
message per server and sends it to every URL, one after the other, each network wait bounded by
`[notify] timeout`. A server's first message goes at once; then, for `cooldown`, the cycles that
reap something are summed into the next message, which goes when the window ends. A message that
a URL does not take is counted and logged, not retried.

Only cycles that terminated, cancelled or logged a session (or would have, in a dry run: the
message says so) make a message: an [ha] follower, which signals nothing, has nothing to say.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reaper.observe.log import get_logger
from reaper.observe.messages import Summary, render, summarize
from reaper.settings import format_duration, load_apprise, redact_url

if TYPE_CHECKING:
    from reaper.observe.cycle import CycleReport
    from reaper.observe.metrics import Metrics
    from reaper.settings import NotifySection, Settings

__all__ = ["CAPACITY", "ERROR_REASONS", "Notifications"]

CAPACITY = 1_000  # cycle summaries queued at most; beyond it the newest are dropped and counted
# The `reason` label of pg_reaper_notify_errors_total: a message a URL did not take (each URL,
# each message), or a cycle left out of every message (the queue was full, or pg-reaper exited
# before it could be sent).
REASON_SEND = "send"
REASON_DROPPED = "dropped"
ERROR_REASONS = (REASON_SEND, REASON_DROPPED)


# --- delivery ----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Target:
    """One URL: its apprise service, and whether it is failing."""

    index: int
    shown: str  # the URL redacted
    service: Any  # an apprise.Apprise holding this URL's service
    failing: bool = False
    failures: int = 0


@dataclass(kw_only=True)
class _Setup:
    """What the thread sends with, replaced whole by `reconfigure`."""

    section: NotifySection
    instance: str
    targets: list[_Target] = field(default_factory=list)


class Notifications:
    """The notification sink of one process: made by the daemon (and `once`), passed to what
    reports cycles, as `Metrics` and the `AuditSink` are. `submit` is called from every job
    thread and never waits; `start`, `reconfigure`, `drain` and `stop` from one."""

    def __init__(self, *, metrics: Metrics | None = None, capacity: int = CAPACITY) -> None:
        self._metrics = metrics
        self._capacity = capacity
        self._setup: _Setup | None = None
        self._queue: collections.deque[Summary] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._pending: dict[str, Summary] = {}
        self._next: dict[str, float] = {}  # server -> monotonic time its window ends
        self._sending = 0  # cycles in the message being sent
        self._draining = False
        self._stopped = False
        self._full = False
        self._thread: threading.Thread | None = None
        self._log = get_logger()
        self.sent = 0  # messages taken by at least one URL
        self.dropped = 0  # cycles left out of every message

    @property
    def enabled(self) -> bool:
        return self._setup is not None

    def start(self, settings: Settings) -> None:
        """Take `settings`' [notify]; nothing happens (and apprise is not imported) without
        URLs."""
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """Apply a new [notify] from the next message on; what is pending stays pending (and is
        dropped, counted, when [notify] is switched off)."""
        section = settings.notify
        with self._ready:
            current = self._setup
        if not section.enabled:
            if current is not None:
                with self._ready:
                    self._setup = None
                    lost = self._forget()
                self._lost(lost, detail="[notify] was switched off")
            return
        if current is not None and current.section == section:
            current.instance = settings.ha.instance
            return
        setup = _Setup(section=section, instance=settings.ha.instance, targets=_targets(section))
        with self._ready:
            self._setup = setup
            self._ready.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
            self._thread.start()
        self._log.info(
            "notify_started",
            urls=[t.shown for t in setup.targets],
            cooldown=format_duration(section.cooldown),
        )

    def submit(self, report: CycleReport) -> None:
        """Queue what `report`'s cycle reaped, without waiting. Never raises: called on the
        reaping path. Nothing happens while [notify] has no URLs, nor for a cycle that reaped
        nothing."""
        setup = self._setup
        if setup is None or not report.outcomes:
            return
        try:
            summary = summarize(report, keep=setup.section.victims)
        except Exception:  # noqa: BLE001 - a bug here must not stop reaping
            self._log.exception("notify_failed", server=report.server, reason="internal")
            return
        if summary is None:
            return
        with self._ready:
            if self._stopped:
                return
            if len(self._queue) >= self._capacity:
                self.dropped += 1
                full, self._full = self._full, True
            else:
                self._queue.append(summary)
                self._ready.notify()
                return
        self._count(REASON_DROPPED)
        if not full:
            self._log.warning(
                "notify_queue_full",
                capacity=self._capacity,
                detail="cycles are left out of notifications until the URLs answer again",
            )

    def drain(self) -> None:
        """From now on send what is pending without waiting for cooldowns (shutdown); returns at
        once, so that the audit writer can flush meanwhile."""
        with self._ready:
            self._draining = True
            self._ready.notify_all()

    def stop(self, *, timeout: float) -> None:
        """Send what is pending, within `timeout` seconds; what is still unsent then is counted
        as dropped and reported (`notify_unsent`). The thread, a daemon thread, is then left to
        end on its own."""
        self.drain()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._ready:
            self._stopped = True
            unsent = self._forget() + self._sending
            self._sending = 0
            self._ready.notify_all()
        self._lost(unsent, detail="not sent before pg-reaper exited")

    # the thread

    def _run(self) -> None:
        while True:
            with self._ready:
                message = self._next_message()
                if message is None:
                    return
            summary, setup = message
            try:
                self._send(summary, setup)
            except Exception:  # noqa: BLE001 - a bug must not end the thread silently
                self._log.exception("notify_failed", server=summary.server, reason="internal")
            with self._ready:
                self._sending = 0

    def _next_message(self) -> tuple[Summary, _Setup] | None:
        """Under the lock: wait for the next message that is due; None once stopped, or once
        drained with nothing left."""
        while not self._stopped:
            setup = self._setup
            while self._queue:
                summary = self._queue.popleft()
                before = self._pending.get(summary.server)
                keep = setup.section.victims if setup is not None else 0
                self._pending[summary.server] = (
                    summary if before is None else before.plus(summary, keep=keep)
                )
            self._full = False
            now = time.monotonic()
            if setup is not None and (server := self._due(now)) is not None:
                summary = self._pending.pop(server)
                self._next[server] = now + setup.section.cooldown.total_seconds()
                self._sending = summary.cycles
                return summary, setup
            if self._draining and not self._queue:
                return None
            due = [self._next[s] for s in self._pending if s in self._next]
            self._ready.wait(max(0.0, min(due) - now) if due else None)
        return None

    def _due(self, now: float) -> str | None:
        """Under the lock: a server whose pending message may go now."""
        for server in self._pending:
            if self._draining or self._next.get(server, now) <= now:
                return server
        return None

    def _send(self, summary: Summary, setup: _Setup) -> None:
        title, body = render(summary, instance=setup.instance, prefix=setup.section.title)
        delivered = 0
        for target in setup.targets:
            try:
                ok = bool(target.service.notify(body=body, title=title))
            except Exception:  # noqa: BLE001 - a plugin's bug is a failed delivery
                ok = False
            if self._stopped:
                return  # given up on by `stop`, which counted this message unsent
            if ok:
                delivered += 1
                if target.failing:
                    self._log.info(
                        "notify_recovered",
                        url=target.shown,
                        index=target.index,
                        failures=target.failures,
                    )
                target.failing, target.failures = False, 0
                continue
            target.failures += 1
            self._count(REASON_SEND)
            level = self._log.debug if target.failing else self._log.error
            level(
                "notify_failed",
                server=summary.server,
                url=target.shown,
                index=target.index,
                reason=REASON_SEND,
                failures=target.failures,
                cycles=summary.cycles,
            )
            target.failing = True
        if delivered:
            self.sent += 1
        self._log.debug(
            "notify_sent",
            server=summary.server,
            cycles=summary.cycles,
            sessions=summary.sessions,
            delivered=delivered,
            urls=len(setup.targets),
        )

    # bookkeeping

    def _forget(self) -> int:
        """Under the lock: drop everything queued and pending; how many cycles that was."""
        cycles = sum(s.cycles for s in self._queue) + sum(s.cycles for s in self._pending.values())
        self._queue.clear()
        self._pending.clear()
        return cycles

    def _lost(self, cycles: int, *, detail: str) -> None:
        if cycles:
            self.dropped += cycles
            self._count(REASON_DROPPED, cycles)
            self._log.error("notify_unsent", cycles=cycles, detail=detail)

    def _count(self, reason: str, amount: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.notify_errors.labels(reason=reason).inc(amount)


def _targets(section: NotifySection) -> list[_Target]:
    """One apprise object per URL, so that each one's delivery is told apart. Sequential
    delivery in the calling thread (no apprise thread pool that would hold the process's exit),
    every socket wait bounded by `timeout`, nothing written to disk."""
    apprise = load_apprise()
    timeout = section.timeout.total_seconds()
    asset = apprise.AppriseAsset(
        async_mode=False,
        service_timeout=0,
        storage_mode="memory",
        secure_logging=True,
        app_id="pg-reaper",
        app_desc="pg-reaper",
    )
    targets = []
    for index, url in enumerate(section.urls):
        secret = url.get_secret_value()
        service = apprise.Apprise.instantiate(secret, asset=asset, suppress_exceptions=True)
        if service is None:  # validated at load: only a changed apprise could refuse it now
            continue
        service.socket_connect_timeout = timeout
        service.socket_read_timeout = timeout
        one = apprise.Apprise(asset=asset)
        one.add(service)
        targets.append(_Target(index=index, shown=redact_url(secret), service=one))
    return targets
