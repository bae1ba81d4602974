"""The access log: request ids, the record's fields, the stdout line, and the file written off the reactor."""

from __future__ import annotations

import io
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_handler import FakeExchange, head
from tlsproxy import logs
from tlsproxy.config import Server, Site, parse_upstream
from tlsproxy.logs import LogOutput
from tlsproxy.proxy import accesslog
from tlsproxy.proxy.accesslog import AccessLog, AccessLogFile, begin, iso_ms
from tlsproxy.proxy.handler import ProxyHandler

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)
FIELDS = {
    "time",
    "client",
    "method",
    "target",
    "protocol",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "host",
    "site",
    "upstream",
    "request_id",
    "referer",
    "user_agent",
}


def exchange_with(*headers: tuple[bytes, bytes], client: str = "203.0.113.7") -> FakeExchange:
    FakeExchange.clock = Clock()
    h = head()
    h.headers += list(headers)
    exchange = FakeExchange(h)
    exchange.client_address = client
    return exchange


def ids_sent(exchange: FakeExchange) -> list[bytes]:
    return [v for k, v in exchange.head.headers if k in (b"x-request-id", b"x_request_id")]


def test_new_request_id_sent_to_the_app() -> None:
    """Every request gets an id of its own, added as X-Request-ID for the app."""
    exchange = exchange_with()
    begin(exchange, Clock(), TRUSTED)
    assert len(exchange.request_id) == 24
    assert ids_sent(exchange) == [exchange.request_id.encode()]


def test_client_request_id_replaced_unless_trusted() -> None:
    """A client's X-Request-ID (or X_Request_ID) is replaced; a trusted proxy's valid one is kept."""
    untrusted = exchange_with((b"x-request-id", b"mine"), (b"x_request_id", b"also"))
    begin(untrusted, Clock(), TRUSTED)
    assert untrusted.request_id != "mine" and ids_sent(untrusted) == [untrusted.request_id.encode()]
    trusted = exchange_with((b"x-request-id", b"lb-1234"), client="10.1.1.1")
    begin(trusted, Clock(), TRUSTED)
    assert trusted.request_id == "lb-1234" and ids_sent(trusted) == [b"lb-1234"]
    odd = exchange_with((b"x-request-id", b"<script>"), client="10.1.1.1")
    begin(odd, Clock(), TRUSTED)
    assert odd.request_id != "<script>" and ids_sent(odd) == [odd.request_id.encode()]


def test_every_underscore_spelling_of_the_id_is_dropped() -> None:
    """X-Request_ID or X_Request-ID from a client could reach the app as HTTP_X_REQUEST_ID too: dropped."""
    exchange = exchange_with((b"x-request_id", b"evil"), (b"x_request-id", b"evil2"))
    begin(exchange, Clock(), TRUSTED)
    sent = [v for k, v in exchange.head.headers if k.replace(b"_", b"-") == b"x-request-id"]
    assert sent == [exchange.request_id.encode()]


def test_record_has_every_field() -> None:
    """The record names host, site, upstream, duration in ms, bytes both ways, status and the id."""
    clock = Clock()
    clock.advance(1_700_000_000.25)
    exchange = exchange_with((b"user-agent", b'curl "x"'))
    begin(exchange, clock, ())
    clock.advance(0.0425)
    record = AccessLog(clock).record(exchange, 200, 1234, "app.test", "http://127.0.0.1:8000", 56)
    assert set(record) == FIELDS
    assert record["duration_ms"] == 42.5
    assert (record["bytes_in"], record["bytes_out"], record["status"]) == (56, 1234, 200)
    assert (record["host"], record["site"], record["upstream"]) == ("app.test", "app.test", "http://127.0.0.1:8000")
    assert record["time"] == "2023-11-14T22:13:20.292Z"
    assert record["request_id"] == exchange.request_id


def test_iso_ms() -> None:
    """Timestamps carry milliseconds."""
    assert iso_ms(0.001) == "1970-01-01T00:00:00.001Z"


def capture(log_format: str) -> tuple[io.StringIO, Logger]:
    out = io.StringIO()
    observer = LogOutput(log_format)(out)
    return out, Logger(namespace="tlsproxy.access", observer=observer)


def test_stdout_json_is_the_fields_once() -> None:
    """In JSON log format a line is the record's fields, without the text line repeated."""
    out, logger = capture("json")
    exchange = exchange_with()
    begin(exchange, Clock(), ())
    AccessLog(Clock(), logger).log(exchange, 502, 0, "app.test", "unix:/run/app.sock", 0)
    line = json.loads(out.getvalue())
    assert FIELDS - {"time"} <= set(line)
    assert "message" not in line and not any(key.startswith("_") for key in line)
    assert line["upstream"] == "unix:/run/app.sock" and line["status"] == 502
    assert line["time"].endswith("Z") and "." in line["time"]


def test_stdout_text_is_combined_then_fields() -> None:
    """The text line starts as the combined format does and adds host, site, upstream, duration and id."""
    out, logger = capture("text")
    exchange = exchange_with((b"referer", b"https://x/"))
    begin(exchange, Clock(), ())
    AccessLog(Clock(), logger).log(exchange, 200, 5, "app.test", "http://a:1", 0)
    line = out.getvalue().strip()
    assert line.startswith('203.0.113.7 - - [01/Jan/1970:00:00:00 +0000] "GET /x HTTP/1.1" 200 5 "https://x/" "-"')
    assert line.endswith(
        f"host=app.test site=app.test upstream=http://a:1 duration_ms=0.0 request_id={exchange.request_id}"
    )


# -- the file ------------------------------------------------------------------


class Threads:
    """Runs each batch when told (or at once, with ``eager``)."""

    def __init__(self, eager: bool = False) -> None:
        self.eager = eager
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        if self.eager:
            try:
                return succeed(f(*args))
            except Exception:
                return fail()
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            d.callback(f(*args))
        except Exception as e:
            d.errback(e)


def test_lines_go_out_in_batches_off_the_reactor(tmp_path: Path) -> None:
    """Lines wait for the timer (or 64 KiB), then go to the thread runner in one batch; one batch at a time."""
    clock, threads = Clock(), Threads()
    path = tmp_path / "access.log"
    log = AccessLogFile(str(path), clock, threads)
    log.write('{"a":1}\n')
    log.write('{"a":2}\n')
    assert threads.calls == [] and not path.exists()
    clock.advance(accesslog.FLUSH_SECONDS)
    assert len(threads.calls) == 1
    log.write('{"a":3}\n')
    clock.advance(accesslog.FLUSH_SECONDS)
    assert len(threads.calls) == 1  # the first batch is still being written
    threads.run()
    assert path.read_text() == '{"a":1}\n{"a":2}\n'
    assert len(threads.calls) == 1  # what came meanwhile follows at once
    threads.run()
    assert path.read_text().count("\n") == 3
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)


def test_a_full_batch_goes_without_waiting(tmp_path: Path) -> None:
    """Past FLUSH_BYTES the batch goes out before the timer."""
    threads = Threads()
    log = AccessLogFile(str(tmp_path / "a.log"), Clock(), threads)
    log.write("x" * accesslog.FLUSH_BYTES + "\n")
    assert len(threads.calls) == 1


def test_reopen_after_rename_writes_the_new_file(tmp_path: Path) -> None:
    """SIGUSR1 after logrotate's rename: later lines go to a new file at the old name."""
    threads = Threads(eager=True)
    path = tmp_path / "access.log"
    log = AccessLogFile(str(path), Clock(), threads)
    log.write("one\n")
    log.flush()
    path.rename(tmp_path / "access.log.1")
    log.write("two\n")
    log.flush()
    assert (tmp_path / "access.log.1").read_text() == "one\ntwo\n"  # still the open file, as logrotate expects
    log.reopen()
    log.write("three\n")
    log.flush()
    assert path.read_text() == "three\n"


def test_close_writes_what_is_pending(tmp_path: Path) -> None:
    """At shutdown the pending lines are written and the file is closed before the Deferred fires."""
    threads = Threads()
    path = tmp_path / "access.log"
    log = AccessLogFile(str(path), Clock(), threads)
    log.write("last\n")
    done = log.close()
    assert not done.called
    threads.run()
    assert done.called and path.read_text() == "last\n"
    assert log._fd is None
    log.write("after\n")
    assert threads.calls == []


def test_slow_disk_drops_lines_past_the_bound(tmp_path: Path) -> None:
    """When the disk does not keep up, memory stays bounded: lines past MAX_PENDING are dropped and counted."""
    threads = Threads()
    log = AccessLogFile(str(tmp_path / "a.log"), Clock(), threads)
    line = "y" * 1023 + "\n"
    for _ in range(accesslog.MAX_PENDING // 1024 + accesslog.FLUSH_BYTES // 1024 + 10):
        log.write(line)
    assert log.pending_size <= accesslog.MAX_PENDING and log.dropped > 0


def test_unwritable_file_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    """A path that cannot be opened costs the lines, not the proxy."""
    log = AccessLogFile(str(tmp_path / "missing-dir" / "a.log"), Clock(), Threads(eager=True))
    log.write("x\n")
    log.flush()
    log.write("y\n")
    log.flush()
    assert log.busy is False


class HandlerTests(SynchronousTestCase):
    def test_proxied_request_is_logged_with_its_upstream_and_id(self) -> None:
        """Through the proxy: the app gets X-Request-ID, the file line has the upstream and the same id."""
        reactor = MemoryReactorClock()
        reactor.advance(1000.0)
        self.patch(FakeExchange, "clock", reactor)
        path = self.mktemp()
        file = AccessLogFile(path, reactor, Threads(eager=True))
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), tls="files")
        handler = ProxyHandler(reactor, [site], Server(), AccessLog(reactor, file=file, stdout=False))
        exchange = FakeExchange(head(method=b"POST", body=b"hello"), b"hello")
        handler.handle(exchange)
        protocol = reactor.tcpClients[0][2].buildProtocol(None)
        wire = StringTransport()
        protocol.makeConnection(wire)
        self.assertIn(b"x-request-id: " + exchange.request_id.encode() + b"\r\n", wire.value())
        reactor.advance(0.25)
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        file.flush()
        record = json.loads(Path(path).read_text())
        self.assertEqual(record["upstream"], "http://127.0.0.1:8000")
        self.assertEqual((record["status"], record["bytes_in"], record["bytes_out"]), (201, 5, 2))
        self.assertEqual(record["request_id"], exchange.request_id)
        self.assertEqual(record["duration_ms"], 250.0)
        self.assertEqual(record["site"], "app.test")


def test_no_fd_leak_on_reopen(tmp_path: Path) -> None:
    """Reopening closes the old descriptor: one file of ours is open, whatever the rotations."""

    def open_here() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd).startswith(str(tmp_path)))

    log = AccessLogFile(str(tmp_path / "a.log"), Clock(), Threads(eager=True))
    for n in range(3):
        log.write(f"{n}\n")
        log.flush()
        (tmp_path / "a.log").rename(tmp_path / f"a.log.{n}")
        log.reopen()
    log.write("last\n")
    log.flush()
    assert open_here() == 1
    log.close()
    assert open_here() == 0


def test_request_ids_differ_across_a_fork() -> None:
    """Ids are unique in a process, and a forked worker gets a prefix of its own."""
    first, second = accesslog.new_request_id(), accesslog.new_request_id()
    assert first != second and len(first) == len(second) == 24
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, accesslog.new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != first[:16]


# -- the stdout line, straight to the line observer ---------------------------------


def odd_exchange(clock: Clock) -> FakeExchange:
    """A request whose line needs every escape: quotes, backslashes, Latin-1 bytes, HTTP/2, no size."""
    FakeExchange.clock = clock
    h = head(method=b"PROPFIND", target=b'/a"b\\c/\xe9t\xe9')
    h.version = b"2"
    h.headers += [(b"referer", b'https://x/"q"'), (b"user-agent", b"curl\\8"), (b"user-agent", b"second")]
    exchange = FakeExchange(h)
    begin(exchange, clock, ())
    return exchange


def both_ways(log_format: str, clock: Clock, exchange: FakeExchange, *args: Any, worker: int | None = None) -> tuple:
    """The stdout line as Twisted's formatter made it, and as the direct path makes it."""
    old, logger = capture(log_format)
    if worker is not None:
        logger.observer.factory.worker, logger.observer.factory.pid = worker, 77
    AccessLog(clock, logger).log(exchange, *args)
    output = LogOutput(log_format)
    output.worker, output.pid = worker, 77
    new = io.StringIO()
    AccessLog(clock, lines=output(new)).log(exchange, *args)
    return old.getvalue(), new.getvalue()


def test_direct_text_line_is_byte_for_byte_the_formatted_one() -> None:
    """The f-string line is what Twisted's formatter wrote from _FORMAT, whatever the escapes and sizes."""
    clock = Clock()
    clock.advance(1_700_000_000.25)
    for exchange, args in [
        (odd_exchange(clock), (404, 0, "", "", 3)),
        (exchange_with((b"user-agent", b"h2load nghttp2/1.59.0")), (200, 100, "app.test", "http://127.0.0.1:8000", 0)),
    ]:
        begin(exchange, clock, ())
        clock.advance(0.0123456)
        old, new = both_ways("text", clock, exchange, *args)
        assert new == old and new.count("\n") == 1
    clock = Clock()
    clock.advance(1_700_000_000.25)
    exchange = odd_exchange(clock)
    clock.advance(0.0425)
    AccessLog(clock, lines=LogOutput("text")(out := io.StringIO())).log(exchange, 404, 0, "", "", 3)
    assert out.getvalue() == (
        '203.0.113.7 - - [14/Nov/2023:22:13:20 +0000] "PROPFIND /a\\"b\\\\c/\xe9t\xe9 HTTP/2" 404 - '
        '"https://x/\\"q\\"" "curl\\\\8" host=app.test site=- upstream=- duration_ms=42.5 '
        f"request_id={exchange.request_id}\n"
    )


def duration_written(ms: float) -> str:
    clock = Clock()
    clock.advance(1e9)
    exchange = exchange_with()
    exchange.started = 1e9 - ms / 1000  # never 0.0, which means "not started"
    out = io.StringIO()
    AccessLog(clock, lines=LogOutput("text")(out)).log(exchange, 200, 1, "s", "u")
    written = out.getvalue().split(" duration_ms=")[1].split()[0]
    assert written == str(round((1e9 - exchange.started) * 1000, 3)), ms
    return written


def test_duration_near_ties_and_edges_is_what_round_writes() -> None:
    """Halfway thousandths, tiny, negative and huge durations come out as str(round(ms, 3))."""
    for ms in [0.0005, 0.0015, 1.0005, 2.675, 2.6745, 42.5, 999.9995, -0.0004, -3.25, 1e12 + 0.5, 0.1]:
        duration_written(ms)
    for n in range(1, 3_000_000, 37):
        duration_written(n / 2000)  # ties and non-ties of the fourth decimal


@given(
    st.floats(min_value=-10.0, max_value=1e13, allow_nan=False)
    | st.integers(0, 10**9).map(lambda n: n / 1000)
    | st.integers(0, 10**9).map(lambda n: n / 10000)
)
def test_duration_is_written_as_round_writes_it(ms: float) -> None:
    """duration_ms in the text line is str(round(ms, 3)), the record's value, for any duration."""
    duration_written(ms)


def test_direct_json_is_the_event_json_line() -> None:
    """In JSON format the direct record has json_line's keys in json_line's order and values, worker included."""
    clock = Clock()
    clock.advance(1_700_000_000.25)
    exchange = odd_exchange(clock)
    for worker in (None, 3):
        old, new = both_ways("json", clock, exchange, 502, 7, "app.test", "unix:/run/app.sock", 9, worker=worker)
        old_record, new_record = json.loads(old), json.loads(new)
        assert list(old_record) == list(new_record)
        assert {**old_record, "time": ""} == {**new_record, "time": ""}
    assert new_record["time"] == "2023-11-14T22:13:20.250Z" and new_record["worker"] == 3
    assert new == (
        '{"time":"2023-11-14T22:13:20.250Z","level":"info","logger":"tlsproxy.access","client":"203.0.113.7",'
        '"method":"PROPFIND","target":"/a\\"b\\\\c/\\u00e9t\\u00e9","protocol":"HTTP/2","status":502,"bytes_in":9,'
        '"bytes_out":7,"duration_ms":0.0,"host":"app.test","site":"app.test","upstream":"unix:/run/app.sock",'
        f'"request_id":"{exchange.request_id}","referer":"https://x/\\"q\\"","user_agent":"curl\\\\8",'
        '"worker":3,"pid":77}\n'
    )


def test_a_level_above_info_hides_access_lines_as_before() -> None:
    """--log-level warn showed no access lines through Twisted's filter; the direct path shows none either."""
    for log_format in ("text", "json"):
        out = io.StringIO()
        AccessLog(Clock(), lines=LogOutput(log_format, LogLevel.warn)(out)).log(exchange_with(), 200, 1)
        assert out.getvalue() == ""


def test_the_installed_output_gets_the_lines_and_the_file_its_json(tmp_path: Path, monkeypatch: Any) -> None:
    """Without a logger of its own the access log writes through the process's installed output, file or not."""
    monkeypatch.setattr(logs, "_installed", None)  # restored after the test: other tests log as before
    reactor = MemoryReactorClock()
    output = LogOutput("text")
    output.install(reactor)
    out = io.StringIO()
    output(out)
    file = AccessLogFile(str(tmp_path / "a.log"), reactor, Threads(eager=True))
    exchange = exchange_with()
    begin(exchange, reactor, ())
    AccessLog(reactor).log(exchange, 200, 5, "app.test")
    AccessLog(reactor, file=file).log(exchange, 201, 5, "app.test")
    file.flush()
    first, second = out.getvalue().splitlines()
    assert '"GET /x HTTP/1.1" 200 5' in first and '"GET /x HTTP/1.1" 201 5' in second
    assert json.loads((tmp_path / "a.log").read_text())["status"] == 201


def test_many_requests_reach_the_file_in_order_through_the_open_batch(tmp_path: Path, monkeypatch: Any) -> None:
    """Lines appended to the open batch and those past BATCH_LINES all go out by the timer, in request order."""
    monkeypatch.setattr(logs, "_installed", None)
    reactor = MemoryReactorClock()
    output = LogOutput("text")
    output.install(reactor)
    with open(tmp_path / "out", "w") as stream:
        output(stream)
        access = AccessLog(reactor)
        for n in range(3 * logs.BATCH_LINES):
            exchange = exchange_with()
            exchange.head.target = b"/%d" % n
            begin(exchange, reactor, ())
            access.log(exchange, 200, n)
        early = (tmp_path / "out").read_text().count("\n")  # at most what filled FLUSH_BYTES
        assert early < 3 * logs.BATCH_LINES
        reactor.advance(logs.FLUSH_SECONDS)
        lines = (tmp_path / "out").read_text().splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /{n} HTTP/1.1" for n in range(3 * logs.BATCH_LINES)]
