"""[notify]: one message per server per cycle that reaped something, through apprise to a local
HTTP receiver (an apprise `json://` URL), from `once` and from `run`; one per cooldown under a
storm; none from an [ha] follower; a receiver that is down or hangs delays no reaping; and the
URL, which holds a token, never shows in logs, errors or printed config."""

from __future__ import annotations

import io
import json
import signal
import string
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reaper.cli import main
from reaper.daemon.balance import member_id, preferred
from reaper.demo.programs import free_port
from reaper.observe.log import configure
from reaper.observe.messages import render, summarize
from reaper.observe.metrics import Metrics
from reaper.observe.notifications import Notifications
from reaper.policy import Decision, Result, Rule
from reaper.settings import ConfigError, LogSection, Settings, load_settings, redact_url
from reaper.sweep import Outcome, SweepReport
from tests.config_helpers import MINIMAL, clean_environment  # noqa: F401 - an autouse fixture
from tests.servers import Sessions, TestServer, usable, wait_for
from tests.test_daemon import RunningDaemon, daemon_config, start_daemon
from tests.test_policy import make_session

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    import psycopg

__all__ = ["start_daemon"]  # the fixture, shared with test_daemon.py

TOKEN = "T0ken-5ecret-4f2a"  # what every URL here hides: in the password and the path
IDLE = Rule(name="idle", action="terminate")


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """What pg-reaper logs during the test, as JSON lines."""
    stream = io.StringIO()
    configure(LogSection(format="json", level="debug"), stream=stream)
    yield stream
    configure(LogSection(format="json"), stream=sys.stderr)


def events(logs: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logs.getvalue().splitlines()]


# --- a local receiver --------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 (a random port) that records every POST's JSON body; with
    `hang`, it takes the request and never answers (until `close`)."""

    def __init__(self, *, hang: bool = False) -> None:
        self.messages: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.requests = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if hang:
                    receiver._release.wait(60)
                    return
                with receiver._lock:
                    receiver.messages.append(json.loads(body))
                    receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return  # the path holds the token: never on the test's stderr

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"json://hook:{TOKEN}@127.0.0.1:{self.port}/hook/{TOKEN}?token={TOKEN}"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def wait(self, count: int, *, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.received()) >= count, timeout=timeout, what=f"{count} messages")
        return self.received()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def hanging() -> Iterator[Receiver]:
    server = Receiver(hang=True)
    yield server
    server.close()


def dead_url() -> str:
    """A json:// URL to a port where nothing listens."""
    return f"json://hook:{TOKEN}@127.0.0.1:{free_port()}/hook/{TOKEN}"


def notify_section(*urls: str, extra: str = "") -> str:
    return f"[notify]\nurls = {json.dumps(list(urls))}\n{textwrap.dedent(extra)}\n"


def settings_with(section: str) -> Settings:
    data = tomllib.loads(section + MINIMAL)
    return Settings(**data)


# --- redaction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("json://127.0.0.1:8080", "json://127.0.0.1:8080"),
        (f"json://127.0.0.1:8080/hook/{TOKEN}", "json://127.0.0.1:8080/…"),
        (
            f"jsons://u:{TOKEN}@hooks.example.com/x?k={TOKEN}#{TOKEN}",
            "jsons://…@hooks.example.com/…",
        ),
        (f"JSON://{TOKEN}@[::1]:9/a", "json://…@[::1]:9/…"),
        (f"mailto://me:{TOKEN}@mail.example.com", "mailto://…@mail.example.com"),
        (f"json://a@b@{TOKEN}.example/x", "json://…@" + f"{TOKEN}.example/…"),
        (f"slack://{TOKEN}/B2/C3", "slack://…"),  # the host place holds a token
        (f"discord://123/{TOKEN}", "discord://…"),
        (f"ntfy://{TOKEN}", "ntfy://…"),  # an ntfy topic is a password
        (f"{TOKEN}", "…"),
        (f"json:/{TOKEN}", "…"),
        (f"j son://{TOKEN}", "…"),
        (f"json://\x1b[31m{TOKEN}/x", "json://…"),
        (f"json://host:{TOKEN}/x", "json://…"),
        (f"json://[{TOKEN}]/x", "json://…"),
        ("json://", "json://…"),
        (f"json://{'a' * 300}/{TOKEN}", "json://…"),
    ],
)
def test_a_url_is_shown_with_its_scheme_and_host_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@given(
    scheme=st.sampled_from(["json", "jsons", "mailto", "slack", "form", "tgram", "x"]),
    secret=st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=40),
    place=st.sampled_from(["user", "password", "path", "query", "fragment", "host"]),
)
def test_a_secret_anywhere_but_a_real_host_never_shows(
    scheme: str, secret: str, place: str
) -> None:
    parts = {"user": "u", "password": "p", "path": "/x", "query": "", "fragment": "", "host": "h"}
    parts[place] = {
        "path": f"/{secret}",
        "query": f"?k={secret}",
        "fragment": f"#{secret}",
    }.get(place, secret)
    url = (
        f"{scheme}://{parts['user']}:{parts['password']}@{parts['host']}:80"
        f"{parts['path']}{parts['query']}{parts['fragment']}"
    )
    shown = redact_url(url)
    hosted = scheme in {"json", "jsons", "mailto", "form"}
    assert (secret in shown) == (place == "host" and hosted)


# --- configuration -----------------------------------------------------------------------------


def test_notify_is_off_by_default_and_check_config_prints_its_defaults(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 0
    printed = tomllib.loads(capsys.readouterr().out)["notify"]
    assert printed == {
        "urls": [],
        "cooldown": "5m",
        "title": "pg-reaper",
        "timeout": "10s",
        "victims": 5,
    }
    assert not load_settings(path).notify.enabled


def test_check_config_prints_every_url_redacted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    discord = f"discord://123456/{TOKEN}"  # a webhook id, then its token
    json_url = f"json://u:{TOKEN}@127.0.0.1:8080/hook/{TOKEN}"
    path.write_text(notify_section(json_url, discord) + MINIMAL, encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert tomllib.loads(out)["notify"]["urls"] == ["json://…@127.0.0.1:8080/…", "discord://…"]
    assert TOKEN not in repr(load_settings(path))  # a SecretStr, even in a traceback


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            notify_section("json://127.0.0.1:1/x", f"bogus://{TOKEN}@host/{TOKEN}"),
            "notify.urls[1]: apprise cannot use this URL (bogus://…)",
        ),
        (
            notify_section(f"json://{TOKEN}@127.0.0.1:1/x json://127.0.0.1:2/y"),
            "notify.urls[0]: not one apprise URL (json://…@127.0.0.1:1/…): it holds white space",
        ),
        (notify_section(extra='colddown = "1m"'), "notify.colddown: unknown key 'colddown'"),
        (notify_section(extra='cooldown = "5 min"'), "notify.cooldown: invalid duration '5 min'"),
        (notify_section(extra='timeout = "0s"'), "notify.timeout: must be greater than 0"),
        (notify_section(extra="victims = -1"), "notify.victims: Input should be greater than"),
        (notify_section(extra='title = "a\\nb"'), "notify.title: invalid title"),
        ('[notify]\nurls = "json://127.0.0.1:1/x"\n', "notify.urls: must be a list"),
    ],
)
def test_a_bad_notify_section_is_an_error_naming_its_key(
    section: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(section + MINIMAL, encoding="utf-8")
    assert main(["check-config", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert expected in err
    assert TOKEN not in err


def test_urls_without_apprise_installed_say_to_install_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise raises ImportError
    path = tmp_path / "config.toml"
    path.write_text(notify_section(f"json://127.0.0.1:1/{TOKEN}") + MINIMAL, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    (problem,) = raised.value.problems
    assert problem.startswith("notify.urls: apprise is not installed")
    assert "pg-reaper[notify]" in problem
    assert TOKEN not in problem
    # Without URLs nothing needs apprise.
    path.write_text(MINIMAL, encoding="utf-8")
    assert not load_settings(path).notify.enabled


def test_apprise_is_loaded_only_when_notify_has_urls(tmp_path: Path) -> None:
    """The reaping path imports no apprise unless [notify] is configured."""
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    probe = (
        "import sys\n"
        "from reaper.cli import main\n"
        "from reaper.daemon import process, scheduler\n"
        "from reaper.observe import notifications\n"
        f"assert main(['check-config', '-c', {str(path)!r}]) == 0\n"
        "assert 'apprise' not in sys.modules, 'apprise imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    path.write_text(notify_section("json://127.0.0.1:1/x") + MINIMAL, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert "apprise imported" in result.stderr  # the probe can tell


def test_a_bad_url_from_the_environment_is_named_and_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PG_REAPER_NOTIFY__URLS", json.dumps([f"nope://{TOKEN}"]))
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    (problem,) = raised.value.problems
    assert problem.startswith("notify.urls[0]: apprise cannot use this URL")
    assert "PG_REAPER_NOTIFY__URLS" in problem
    assert TOKEN not in problem


# --- what a message says -----------------------------------------------------------------------


def _outcome(result: Result = Result.TERMINATED, *, rule: Rule = IDLE, **session: Any) -> Outcome:
    decision = Decision(session=make_session(**session), policy=rule, reason="idle")
    return Outcome(decision=decision, result=result)


def _report(*outcomes: Outcome, server: str = "primary", dry_run: bool = False) -> SweepReport:
    return SweepReport(server=server, dry_run=dry_run, duration_ms=1.0, outcomes=outcomes)


def test_a_cycle_that_reaped_nothing_makes_no_message() -> None:
    assert summarize(_report(), keep=5) is None
    failed = _report(_outcome(Result.DENIED), _outcome(Result.CHANGED, pid=2))
    assert summarize(failed, keep=5) is None
    follower = _report(_outcome(Result.NOT_LEADER), _outcome(Result.DEFERRED, pid=2))
    assert summarize(follower, keep=5) is None


def test_a_message_counts_by_policy_and_lists_the_oldest_victims_never_a_query() -> None:
    stuck = Rule(name="stuck", action="terminate")
    report = _report(
        *[_outcome(pid=10 + i, idle_seconds=100 + i, application=f"web{i}") for i in range(4)],
        _outcome(rule=stuck, pid=3, idle_seconds=7200, state="idle in transaction"),
        _outcome(Result.DENIED, pid=4),
        _outcome(Result.GONE, pid=5),
    )
    summary = summarize(report, keep=3)
    assert summary is not None
    title, body = render(summary, instance="host-a:1", prefix="pg-reaper")
    assert title == "pg-reaper on primary: 5 terminated"
    assert "instance host-a:1" in body
    assert "  idle: 4 terminated" in body
    assert "  stuck: 1 terminated" in body
    assert "Could not be signalled: 1 denied, 1 gone." in body
    assert "Oldest (3 of 5):" in body
    oldest = body.split("Oldest (3 of 5):\n")[1].splitlines()
    assert [line.split(",")[0].strip() for line in oldest] == ["pid 3", "pid 13", "pid 12"]
    assert "from 10.1.2.3: idle in transaction for 2h (policy stuck, terminated)" in oldest[0]
    assert 'application "web3"' in oldest[1]
    assert "SELECT" not in body


def test_names_from_the_server_are_quoted_escaped_and_cut_short() -> None:
    hostile = 'x"\x1b[31m\n@channel\u202e' + "y" * 100
    summary = summarize(_report(_outcome(application=hostile, user="u\nv")), keep=5)
    assert summary is not None
    _, body = render(summary, instance="i", prefix="pg-reaper")
    line = body.splitlines()[-1]
    assert '"x\\"\\x1b[31m\\n@channel\\u202e' + "y" * 47 + '…"' in line
    assert 'user "u\\nv"' in line
    assert "\x1b" not in body
    assert len(body.splitlines()) == 7


def test_a_dry_run_says_what_would_have_been_done() -> None:
    cancel = Rule(name="runaway", action="cancel")
    report = _report(
        _outcome(Result.DRY_RUN),
        _outcome(Result.DRY_RUN, rule=cancel, pid=2, state="active"),
        dry_run=True,
    )
    summary = summarize(report, keep=5)
    assert summary is not None
    title, body = render(summary, instance="i", prefix="db-team")
    assert title == "db-team on primary: 1 would cancel, 1 would terminate (dry run)"
    assert "Dry run: no session was signalled." in body


def test_cycles_summed_across_the_end_of_a_dry_run_are_not_called_a_dry_run() -> None:
    dry = summarize(_report(_outcome(Result.DRY_RUN), dry_run=True), keep=5)
    real = summarize(_report(_outcome(pid=2)), keep=5)
    assert dry is not None
    assert real is not None
    title, body = render(dry.plus(real, keep=5), instance="i", prefix="pg-reaper")
    assert title == "pg-reaper on primary: 1 terminated, 1 would terminate"
    assert "Dry run" not in body
    assert "2 cycles" in body


# --- delivery, without a database --------------------------------------------------------------


def _sink(
    *urls: str, extra: str = "", capacity: int = 1000
) -> tuple[Notifications, Metrics, Settings]:
    metrics = Metrics()
    sink = Notifications(metrics=metrics, capacity=capacity)
    settings = settings_with(notify_section(*urls, extra=extra))
    sink.start(settings)
    return sink, metrics, settings


def _errors(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("pg_reaper_notify_errors_total", {"reason": reason})
    assert value is not None
    return value


def test_each_reaping_cycle_is_one_message_and_a_quiet_one_none(receiver: Receiver) -> None:
    sink, metrics, _ = _sink(receiver.url, extra='cooldown = "0s"')
    sink.submit(_report(_outcome(pid=1), _outcome(pid=2)))
    sink.submit(_report(_outcome(Result.DEFERRED)))
    sink.submit(_report(_outcome(pid=3), server="other"))
    sink.stop(timeout=10)
    messages = receiver.received()
    assert sorted(m["title"] for m in messages) == [
        "pg-reaper on other: 1 terminated",
        "pg-reaper on primary: 2 terminated",
    ]
    assert receiver.paths == [f"/hook/{TOKEN}"] * 2
    assert _errors(metrics, "send") == 0
    assert _errors(metrics, "dropped") == 0


def test_a_storm_sends_one_message_per_cooldown_the_rest_summed_into_the_next(
    receiver: Receiver,
) -> None:
    sink, _, _ = _sink(receiver.url, extra='cooldown = "1500ms"')
    started = time.monotonic()
    sink.submit(_report(_outcome(pid=1)))
    receiver.wait(1)
    for pid in range(2, 6):  # four more cycles inside the window
        sink.submit(_report(_outcome(pid=pid, idle_seconds=pid)))
    time.sleep(0.5)
    assert len(receiver.received()) == 1
    second = receiver.wait(2, timeout=5)[1]
    assert time.monotonic() - started >= 1.4
    assert second["title"] == "pg-reaper on primary: 4 terminated"
    assert "4 cycles from" in second["message"]
    sink.stop(timeout=5)
    assert len(receiver.received()) == 2


def test_what_is_pending_at_stop_is_sent_without_waiting_for_the_cooldown(
    receiver: Receiver,
) -> None:
    sink, _, _ = _sink(receiver.url, extra='cooldown = "1h"')
    sink.submit(_report(_outcome(pid=1)))
    receiver.wait(1)
    sink.submit(_report(_outcome(pid=2)))
    sink.submit(_report(_outcome(pid=3)))
    started = time.monotonic()
    sink.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert receiver.received()[1]["title"] == "pg-reaper on primary: 2 terminated"


def test_a_hanging_receiver_never_holds_submit_and_stop_gives_up_in_time(
    hanging: Receiver, logs: io.StringIO
) -> None:
    sink, metrics, _ = _sink(hanging.url, extra='cooldown = "0s"\ntimeout = "30s"', capacity=3)
    sink.submit(_report(_outcome(pid=1)))
    wait_for(lambda: hanging.requests == 1, what="the first request")
    started = time.monotonic()
    for pid in range(2, 12):  # 3 fit in the queue, 7 are dropped
        sink.submit(_report(_outcome(pid=pid)))
    assert time.monotonic() - started < 0.5
    assert _errors(metrics, "dropped") == 7
    started = time.monotonic()
    sink.stop(timeout=1)
    assert 0.9 < time.monotonic() - started < 3
    assert _errors(metrics, "dropped") == 11  # the 3 queued and the one being sent, too
    said = events(logs)
    assert [e["event"] for e in said].count("notify_queue_full") == 1
    assert any(e["event"] == "notify_unsent" and e["cycles"] == 4 for e in said)
    assert TOKEN not in logs.getvalue()


def test_a_receiver_that_is_down_is_counted_logged_once_and_never_named(
    receiver: Receiver, logs: io.StringIO
) -> None:
    down = dead_url()
    sink, metrics, _ = _sink(down, receiver.url, extra='cooldown = "0s"')
    for pid in (1, 2, 3):
        sink.submit(_report(_outcome(pid=pid), server=f"s{pid}"))
    sink.stop(timeout=10)
    assert len(receiver.received()) == 3  # the other URL still gets every message
    assert _errors(metrics, "send") == 3
    failed = [e for e in events(logs) if e["event"] == "notify_failed"]
    assert [e["level"] for e in failed] == ["error", "debug", "debug"]
    assert failed[0]["url"] == redact_url(down)
    assert failed[0]["url"].startswith("json://…@127.0.0.1:")
    assert failed[0]["index"] == 0
    assert TOKEN not in logs.getvalue()


def test_a_reload_sends_the_next_message_to_the_new_urls(receiver: Receiver) -> None:
    sink, _, _ = _sink(receiver.url, extra='cooldown = "0s"')
    sink.submit(_report(_outcome(pid=1)))
    receiver.wait(1)
    other = Receiver()
    try:
        sink.reconfigure(settings_with(notify_section(other.url, extra='title = "db-team"')))
        sink.submit(_report(_outcome(pid=2)))
        sink.stop(timeout=5)
        (message,) = other.received()
        assert message["title"] == "db-team on primary: 1 terminated"
        assert len(receiver.received()) == 1
    finally:
        other.close()


def test_without_urls_nothing_is_started_and_submit_does_nothing() -> None:
    sink = Notifications()
    sink.start(settings_with(""))
    assert not sink.enabled
    sink.submit(_report(_outcome()))
    sink.stop(timeout=0)
    assert sink.dropped == 0


def test_a_reload_that_removes_every_url_drops_what_was_pending(
    receiver: Receiver, logs: io.StringIO
) -> None:
    sink, metrics, _ = _sink(receiver.url, extra='cooldown = "1h"')
    sink.submit(_report(_outcome(pid=1)))
    receiver.wait(1)
    sink.submit(_report(_outcome(pid=2)))
    wait_for(lambda: not sink._queue, what="the cycle to be taken")
    sink.reconfigure(settings_with(""))
    assert not sink.enabled
    assert _errors(metrics, "dropped") == 1
    sink.stop(timeout=1)
    assert len(receiver.received()) == 1
    assert [e["cycles"] for e in events(logs) if e["event"] == "notify_unsent"] == [1]


# --- `once`, against a real server -------------------------------------------------------------


def _once_config(write_config: Callable[..., Path], prefix: str, notify: str) -> Path:
    path = write_config(
        textwrap.dedent(
            f"""
            [[policies]]
            name = "idle"
            states = ["idle"]
            max_idle = "1s"
            applications = ["^{prefix}"]
            """
        )
    )
    path.write_text(notify + path.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _eligible(pg: TestServer, pids: list[int]) -> None:
    wait_for(
        lambda: all(
            row[0] > 1.2
            for row in pg.execute(
                "SELECT extract(epoch FROM now() - state_change)::float8 FROM pg_stat_activity "
                "WHERE pid = ANY(%s)",
                [pids],
            )
        ),
        what="sessions idle past max_idle",
    )


@pytest.mark.integration
def test_once_sends_one_batched_message_for_the_cycle_that_reaped(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _once_config(write_config, "notify-once-", notify_section(receiver.url))
    conns = [sessions.idle(application=f"notify-once-{i}") for i in range(3)]
    _eligible(pg, [c.info.backend_pid for c in conns])
    assert main(["once", "-c", str(path)]) == 0
    (message,) = receiver.received()  # sent before `once` returned
    assert message["title"] == f"pg-reaper on pg{pg.major}: 3 terminated"
    assert "  idle: 3 terminated" in message["message"]
    assert 'application "notify-once-' in message["message"]
    assert not any(usable(c) for c in conns)
    assert main(["once", "-c", str(path)]) == 0  # nothing left to reap: nothing to say
    assert len(receiver.received()) == 1
    out, err = capsys.readouterr()
    assert TOKEN not in out + err


@pytest.mark.integration
def test_once_dry_run_says_what_it_would_have_done(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    receiver: Receiver,
) -> None:
    path = _once_config(write_config, "notify-dry-", notify_section(receiver.url))
    conn = sessions.idle(application="notify-dry-1")
    _eligible(pg, [conn.info.backend_pid])
    assert main(["once", "-c", str(path), "--dry-run"]) == 0
    (message,) = receiver.received()
    assert message["title"] == f"pg-reaper on pg{pg.major}: 1 would terminate (dry run)"
    assert usable(conn)


@pytest.mark.integration
def test_once_with_a_hanging_receiver_reaps_and_exits_within_its_flush_bound(
    pg: TestServer,
    sessions: Sessions,
    write_config: Callable[..., Path],
    hanging: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    notify = notify_section(hanging.url, dead_url(), extra='timeout = "1m"')
    path = _once_config(write_config, "notify-hang-", notify)
    conn = sessions.idle(application="notify-hang-1")
    _eligible(pg, [conn.info.backend_pid])
    started = time.monotonic()
    assert main(["once", "-c", str(path), "--json"]) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 8, elapsed  # the sweep, then 5 s at most for the notifications
    assert not usable(conn)
    assert hanging.requests == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["servers"][0]["reaped"] == 1
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] == "notify_unsent" and e["cycles"] == 1 for e in events)
    assert TOKEN not in out + err


# --- `run`, a real daemon ----------------------------------------------------------------------


def _policy(prefix: str) -> str:
    return textwrap.dedent(
        f"""
        [[policies]]
        name = "idle"
        states = ["idle"]
        max_idle = "1s"
        applications = ["^{prefix}"]
        """
    )


def _daemon(
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    pg: TestServer,
    *,
    notify: str,
    prefix: str,
    name: str = "config.toml",
) -> RunningDaemon:
    port = free_port()
    config = daemon_config(
        tmp_path / name,
        servers={f"pg{pg.major}": pg.dsn()},
        policies=notify + _policy(prefix),
        port=port,
        interval="2s",
    )
    daemon = start_daemon(config, port=port)
    daemon.wait_ready()
    return daemon


def _gone(pg: TestServer, conn: psycopg.Connection[Any]) -> Callable[[], bool]:
    """Whether `conn`'s backend has exited, in the server's view (a client-side check would run
    a statement, and keep the session from ever being idle)."""
    pid = conn.info.backend_pid
    return lambda: not pg.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])


def _reaping_cycles(daemon: RunningDaemon) -> int:
    """Polls that reaped, and armed timers that did: each one is a cycle for [notify]."""
    fired = daemon.events("armed_signals_fired")
    return sum(1 for e in [*daemon.events("poll_completed"), *fired] if e["reaped"])


@pytest.mark.integration
def test_run_sends_one_message_per_cycle_that_reaped(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    conns = [sessions.idle(application=f"notify-run-{i}") for i in range(3)]
    _eligible(pg, [c.info.backend_pid for c in conns])
    daemon = _daemon(
        start_daemon,
        tmp_path,
        pg,
        notify=notify_section(receiver.url, extra='cooldown = "0s"'),
        prefix="notify-run-",
    )
    (first,) = receiver.wait(1)
    assert first["title"] == f"pg-reaper on pg{pg.major}: 3 terminated"
    late = sessions.idle(application="notify-run-late")
    daemon.wait_until(_gone(pg, late), timeout=10, what="the late session reaped")
    messages = receiver.wait(2)
    time.sleep(2.5)  # a further cycle or two, with nothing to reap
    assert len(receiver.received()) == _reaping_cycles(daemon) == 2
    assert messages[1]["title"] == f"pg-reaper on pg{pg.major}: 1 terminated"
    assert f"instance {daemon.events('session_reaped')[0]['instance']}" in messages[1]["message"]
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=10) == 0
    assert len(receiver.received()) == 2
    assert TOKEN not in daemon.stderr_text()
    assert not daemon.other_lines


@pytest.mark.integration
def test_run_under_a_storm_sends_one_message_per_cooldown_and_the_rest_at_sigterm(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    daemon = _daemon(
        start_daemon,
        tmp_path,
        pg,
        notify=notify_section(receiver.url, extra='cooldown = "1h"'),
        prefix="notify-storm-",
    )
    for wave in range(3):  # three cycles that each reap one session
        conn = sessions.idle(application=f"notify-storm-{wave}")
        daemon.wait_until(_gone(pg, conn), timeout=10, what=f"wave {wave} reaped")
    daemon.wait_until(lambda: _reaping_cycles(daemon) == 3, timeout=5, what="3 reaping cycles")
    receiver.wait(1)
    time.sleep(1)
    assert len(receiver.received()) == 1  # the other two wait for the window to end
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=10) == 0
    first, second = receiver.wait(2, timeout=1)
    assert first["title"] == f"pg-reaper on pg{pg.major}: 1 terminated"
    assert second["title"] == f"pg-reaper on pg{pg.major}: 2 terminated"
    assert "2 cycles from" in second["message"]
    assert not daemon.events("notify_unsent")


@pytest.mark.integration
def test_a_hanging_receiver_never_delays_reaping_and_is_counted(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    hanging: Receiver,
) -> None:
    daemon = _daemon(
        start_daemon,
        tmp_path,
        pg,
        notify=notify_section(hanging.url, extra='cooldown = "0s"\ntimeout = "2s"'),
        prefix="notify-slow-",
    )
    for wave in range(3):
        conn = sessions.idle(application=f"notify-slow-{wave}")
        opened = time.monotonic()
        daemon.wait_until(_gone(pg, conn), timeout=10, what=f"wave {wave} reaped")
        # Reaped about a second after it became eligible, as without [notify]; the receiver
        # holds each message for 2 s meanwhile.
        assert time.monotonic() - opened < 4.5
    daemon.wait_value(
        "pg_reaper_notify_errors_total", lambda v: (v or 0) >= 1, reason="send", timeout=10
    )
    failed = daemon.wait_event("notify_failed")
    assert failed["url"] == f"json://…@127.0.0.1:{hanging.port}/…"
    assert TOKEN not in daemon.get("/metrics")[1]
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert TOKEN not in daemon.stderr_text()
    assert not daemon.other_lines


@pytest.mark.integration
def test_an_ha_follower_sends_nothing(
    pg: TestServer,
    sessions: Sessions,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
) -> None:
    receivers = [Receiver(), Receiver()]
    server = f"pg{pg.major}"
    # The instance that should lead the server starts first and takes it: balanced leadership
    # would otherwise hand it over while the test runs.
    names = ["notify-0", "notify-1"]
    members = {member_id(name): name for name in names}
    if members.get(preferred(server, (server,), frozenset(members)) or 0) == names[1]:
        names.reverse()
    try:
        daemons = []
        for i, r in enumerate(receivers):
            daemon = _daemon(
                start_daemon,
                tmp_path,
                pg,
                notify=notify_section(r.url, extra='cooldown = "0s"')
                + f'[ha]\nenabled = true\ninstance_id = "{names[i]}"\n',
                prefix="notify-ha-",
                name=f"config{i}.toml",
            )
            daemon.wait_value("pg_reaper_leader", lambda v: v is not None, server=server)
            daemons.append(daemon)
        assert [d.value("pg_reaper_leader", server=server) for d in daemons] == [1, 0]
        leader = 0
        for wave in range(2):
            conn = sessions.idle(application=f"notify-ha-{wave}")
            wait_for(_gone(pg, conn), timeout=10, what=f"wave {wave} reaped")
        receivers[leader].wait(1)
        follower = daemons[1 - leader]

        def probes() -> float:
            return follower.value("pg_reaper_ha_probes_total", server=server) or 0.0

        before = probes()
        follower.wait_until(
            lambda: probes() > before, timeout=10, what="a follower's cycle after the reaping"
        )
        assert follower.value("pg_reaper_leader", server=server) == 0
        assert receivers[1 - leader].requests == 0
        assert not follower.events("session_reaped")
        assert f"instance {names[leader]}" in receivers[leader].received()[0]["message"]
    finally:
        for r in receivers:
            r.close()
