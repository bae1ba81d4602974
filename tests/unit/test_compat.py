"""Canaries for every private API tlsproxy uses (tlsproxy/compat/), and the rule that keeps them there.

Each canary exercises the private name the way tlsproxy uses it, so a release
of a dependency that moves it fails here, naming the compat module to update,
rather than in production.
"""

from __future__ import annotations

import ast
import inspect
import tomllib
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests
import trustme
from acme import client as acme_client
from h2.config import H2Configuration
from h2.events import RequestReceived
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame
from OpenSSL import SSL
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from twisted.internet import base
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tests.tlsutil import certified
from tlsproxy.compat import acme as compat_acme
from tlsproxy.compat import h2 as compat_h2
from tlsproxy.compat import openssl as compat_openssl
from tlsproxy.compat import twisted as compat_twisted

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tlsproxy"

# Attribute names private to a dependency that tlsproxy reads somewhere (in compat/ only).
PRIVATE_ATTRIBUTES = frozenset(
    {
        "_ssl",
        "_into_ssl",
        "_from_ssl",
        "_context",
        "_raise_ssl_error",
        "_receive_data_frame",
        "_send_request",
        "_post",
        "_poller",
        "_selectables",
        "_doReadOrWrite",
        "_disconnectSelectable",
        "dataBuffer",
        "_tempDataBuffer",
        "_parseServer",
        "_logger",
        "_post_once",
    }
)
THIRD_PARTY = ("OpenSSL", "twisted", "h2", "hpack", "hyperframe", "acme", "josepy", "cryptography", "service_identity")


class BoundsTests(SynchronousTestCase):
    def test_installed_versions_within_tested_bounds(self) -> None:
        """Every installed runtime dependency satisfies pyproject's bounds, and each bound has an upper limit."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for line in project["dependencies"]:
            requirement = Requirement(line)
            if requirement.name == "certifi":
                continue  # a data package: newer is always better
            self.assertTrue(
                any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier),
                f"{requirement.name} has no upper bound in pyproject.toml",
            )
            installed = metadata.version(requirement.name)
            self.assertIn(installed, requirement.specifier, f"{requirement.name} {installed} is outside {line}")

    def test_constraints_pin_what_is_installed(self) -> None:
        """constraints.txt pins each runtime dependency, within pyproject's bounds."""
        pins = {}
        for raw in (ROOT / "constraints.txt").read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                requirement = Requirement(line)
                pins[canonicalize_name(requirement.name)] = requirement
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for line in project["dependencies"]:
            requirement = Requirement(line)
            pin = pins.get(canonicalize_name(requirement.name))
            self.assertIsNotNone(pin, f"constraints.txt does not pin {requirement.name}")
            assert pin is not None
            (spec,) = pin.specifier
            self.assertEqual(spec.operator, "==")
            self.assertIn(spec.version, requirement.specifier, f"constraints.txt pins {pin} outside {line}")


class PrivateApiRuleTests(SynchronousTestCase):
    def test_no_private_api_outside_compat(self) -> None:
        """Outside tlsproxy/compat, no module imports or reads a dependency's private name."""
        offences = []
        for path in sorted(PACKAGE.rglob("*.py")):
            if "compat" in path.relative_to(PACKAGE).parts:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
                    if any(part.startswith("_") for part in node.module.split(".")):
                        offences.append(f"{where} imports from {node.module}")
                    offences.extend(
                        f"{where} imports {alias.name}" for alias in node.names if alias.name in PRIVATE_ATTRIBUTES
                    )
                elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                    if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                        offences.append(f"{where} reads .{node.attr}")
        self.assertEqual(offences, [], "private APIs belong in tlsproxy/compat/")

    def test_rule_catches_an_offence(self) -> None:
        """The rule above is not vacuous: compat itself is full of what it forbids."""
        text = (PACKAGE / "compat" / "openssl.py").read_text()
        self.assertIn("from OpenSSL._util import", text)
        self.assertIn("conn._ssl", text)


def _memory_pair() -> tuple[SSL.Connection, SSL.Connection]:
    ca = trustme.CA()
    server_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    leaf = certified(ca, "canary.test")
    server_ctx.use_certificate(leaf.leaf)
    server_ctx.use_privatekey(leaf.key)
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    return server, client


class OpenSSLCanaryTests(SynchronousTestCase):
    """pyOpenSSL: see tlsproxy/compat/openssl.py if one of these fails."""

    def test_handles_drive_a_handshake(self) -> None:
        """SSL_do_handshake and the BIOs through compat's handles complete a real handshake."""
        server, client = _memory_pair()
        ssl, into, out = compat_openssl.connection_handles(server)
        lib, ffi = compat_openssl.lib, compat_openssl.ffi
        buffer = ffi.new("char[]", 1 << 16)
        for _ in range(10):
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            while True:
                try:
                    data = client.bio_read(1 << 16)
                except SSL.WantReadError:
                    break
                with ffi.from_buffer(data) as view:
                    self.assertEqual(lib.BIO_write(into, view, len(data)), len(data))
            result = lib.SSL_do_handshake(ssl)
            if result != 1:
                self.assertEqual(lib.SSL_get_error(ssl, result), lib.SSL_ERROR_WANT_READ)
            pending = lib.BIO_get_mem_data(out, ffi.NULL)
            if pending:
                n = lib.BIO_read(out, buffer, pending)
                client.bio_write(ffi.unpack(buffer, n))
            if result == 1 and client.get_peer_certificate() is not None:
                break
        self.assertEqual(result, 1)
        self.assertEqual(lib.SSL_write(ssl, b"hi", 2), 2)
        self.assertEqual(lib.SSL_pending(ssl), 0)
        self.assertTrue(callable(lib.SSL_read) and callable(lib.SSL_shutdown))
        self.assertEqual(lib.SSL_ERROR_ZERO_RETURN, 6)

    def test_raise_ssl_error(self) -> None:
        """pyOpenSSL's error translation raises SSL.Error for a failed handshake."""
        server, _client = _memory_pair()
        ssl, into, _out = compat_openssl.connection_handles(server)
        junk = b"\x16\x03\x01\x00\x05hello"
        compat_openssl.lib.BIO_write(into, junk, len(junk))
        result = compat_openssl.lib.SSL_do_handshake(ssl)
        with self.assertRaises(SSL.Error):
            compat_openssl.raise_ssl_error(server, result)

    def test_set_groups(self) -> None:
        """Groups OpenSSL knows are taken; a made-up one is refused, not ignored."""
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.assertNotEqual(compat_openssl.context_handle(ctx), compat_openssl.ffi.NULL)
        self.assertTrue(compat_openssl.set_groups(ctx, "X25519:P-256:P-384"))
        self.assertFalse(compat_openssl.set_groups(SSL.Context(SSL.TLS_SERVER_METHOD), "no-such-group"))


class TwistedCanaryTests(SynchronousTestCase):
    """Twisted: see tlsproxy/compat/twisted.py if one of these fails."""

    def test_parse_server_endpoint(self) -> None:
        """Endpoint strings split into kind, arguments and options."""
        kind, args, kwargs = compat_twisted.parse_server_endpoint("tcp:443:interface=127.0.0.1")
        self.assertEqual((kind.lower(), args[0], kwargs["interface"]), ("tcp", 443, "127.0.0.1"))
        kind, args, kwargs = compat_twisted.parse_server_endpoint("unix:/run/x.sock")
        self.assertEqual((kind.lower(), args[0]), ("unix", "/run/x.sock"))

    def test_reactor_poll_state(self) -> None:
        """An epoll reactor has the poller, selectable map and dispatch methods the fast loop uses."""
        reactor = EPollReactor()
        try:
            poller, selectables, dispatch, disconnect = compat_twisted.reactor_poll_state(reactor)
            self.assertEqual(poller.poll(0, 1), [])
            self.assertIsInstance(selectables, dict)
            self.assertEqual(list(inspect.signature(dispatch).parameters), ["selectable", "fd", "event"])
            self.assertEqual(list(inspect.signature(disconnect).parameters)[:3], ["selectable", "why", "isRead"])
        finally:
            reactor._poller.close()

    def test_transport_buffers(self) -> None:
        """A FileDescriptor keeps unsent bytes in dataBuffer and _tempDataBuffer."""
        fd: Any = FileDescriptor()
        self.assertTrue(compat_twisted.nothing_buffered(fd))
        fd._tempDataBuffer.append(b"x")
        self.assertFalse(compat_twisted.nothing_buffered(fd))

    def test_tcp_connection_skips_shutdown_when_told(self) -> None:
        """A TCP connection calls shutdown(2) before close unless _shouldShutdown is False (a handoff)."""
        import socket as socket_module

        from twisted.internet import tcp

        calls: list[str] = []

        class Socket:
            def shutdown(self, how: int) -> None:
                calls.append("shutdown")

            def setsockopt(self, *args: Any) -> None:
                calls.append("setsockopt")

            def close(self) -> None:
                calls.append("close")

        reactor = EPollReactor()
        try:
            a, b = socket_module.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            connection = tcp.Connection(a, None, reactor=reactor)
            self.assertTrue(connection._shouldShutdown)
            connection.socket = Socket()
            connection._shouldShutdown = False
            connection._closeSocket(True)
            self.assertEqual(calls, ["close"])
            seen: list[bool] = []
            fake: Any = SimpleNamespace(loseConnection=lambda: seen.append(fake._shouldShutdown))
            compat_twisted.close_without_shutdown(fake)
            self.assertEqual(seen, [False])
        finally:
            reactor._poller.close()

    def test_port_logs_accept_events_through_its_logger(self) -> None:
        """A TCP port keeps a Logger as _logger, and its accept loop logs the EMFILE events we count."""
        from twisted.internet import tcp

        reactor = EPollReactor()
        try:
            port = tcp.Port(0, None, interface="127.0.0.1", reactor=reactor)
            self.assertIsInstance(port._logger, Logger)
            seen: list[Any] = []
            self.assertTrue(compat_twisted.observe_port_log(port, seen.append))
            port._logger.info("x")
            self.assertEqual(len(seen), 1)
        finally:
            reactor._poller.close()

    def test_accept_loop_logs_the_emfile_events_we_count(self) -> None:
        """Out of descriptors, Twisted's accept loop logs the events listening.py counts, by these formats."""
        import errno

        from twisted.internet import tcp

        class Client:
            def close(self) -> None:
                pass

        class Listener:
            def __init__(self) -> None:
                self.outcomes: list[Any] = [OSError(errno.EMFILE, "x"), (Client(), ("192.0.2.1", 1))]
                self.outcomes.append(OSError(errno.EAGAIN, "x"))

            def accept(self) -> Any:
                outcome = self.outcomes.pop(0)
                if isinstance(outcome, OSError):
                    raise outcome
                return outcome

        class Reserved:
            def available(self) -> bool:
                return True

            def __enter__(self) -> None:
                pass

            def __exit__(self, *exc: object) -> None:
                pass

        events: list[Any] = []
        list(tcp._accept(Logger(observer=events.append), range(5), Listener(), Reserved()))
        formats = [event["log_format"] for event in events]
        expected = [compat_twisted.EMFILE_NOISE[0], compat_twisted.EMFILE_REFUSED, compat_twisted.EMFILE_NOISE[1]]
        self.assertEqual(formats, expected)
        events.clear()
        listener = Listener()
        listener.outcomes = [OSError(errno.ENOBUFS, "x")]
        list(tcp._accept(Logger(observer=events.append), range(5), listener, Reserved()))
        self.assertEqual([event["log_format"] for event in events], [compat_twisted.CANNOT_ACCEPT])

    def test_connector_refers_to_transport(self) -> None:
        """A connector keeps its transport as .transport (the cycle compat breaks)."""
        self.assertRegex(inspect.getsource(base.BaseConnector.connect), r"self\.transport\b[^=\n]*= ")


def _headers(stream: int, block: bytes, end: bool) -> Any:
    """A HEADERS frame carrying ``block`` whole."""
    from hyperframe.frame import HeadersFrame

    frame = HeadersFrame(stream, data=block)
    frame.flags.add("END_HEADERS")
    if end:
        frame.flags.add("END_STREAM")
    return frame


class H2CanaryTests(SynchronousTestCase):
    """h2: see tlsproxy/compat/h2.py if this fails."""

    def test_body_length_error_reaches_the_hook(self) -> None:
        """A DATA frame longer than the stream's content-length goes to body_length_error."""
        seen = []

        class Conn(compat_h2.StreamErrorConnection):
            def body_length_error(self, frame: Any) -> tuple[list[Any], list[Any]]:
                seen.append(frame.stream_id)
                return [], []

        client = compat_h2.H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        server = Conn(H2Configuration(client_side=False))
        server.initiate_connection()
        headers = [(":method", "POST"), (":path", "/"), (":scheme", "https"), (":authority", "a")]
        headers.append(("content-length", "1"))
        client.send_headers(1, headers)
        events = server.receive_data(client.data_to_send())
        self.assertTrue(any(isinstance(e, RequestReceived) for e in events))
        frame = DataFrame(1, data=b"too long")
        server.receive_data(frame.serialize())
        self.assertEqual(seen, [1])

    def test_decoder_is_used_as_installed(self) -> None:
        """After use_decoder, h2 decodes every block with decode(raw=True) and sets the two limits on it."""
        from hpack import Decoder

        calls: list[tuple[str, Any]] = []

        class Recording:
            def __init__(self) -> None:
                self.inner = Decoder()

            def decode(self, data: bytes, raw: bool = False) -> Any:
                calls.append(("decode", raw))
                return self.inner.decode(data, raw=raw)

            def __setattr__(self, name: str, value: Any) -> None:
                if name != "inner":
                    calls.append((name, value))
                object.__setattr__(self, name, value)

        client = compat_h2.H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        server = compat_h2.H2Connection(H2Configuration(client_side=False))
        compat_h2.use_decoder(server, Recording())
        server.initiate_connection()
        server.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 5000, SettingCodes.HEADER_TABLE_SIZE: 2048})
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())  # the client's preface, SETTINGS and ACK
        client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")])
        events = server.receive_data(client.data_to_send())
        self.assertIn(("max_header_list_size", 5000), calls)
        self.assertIn(("max_allowed_table_size", 2048), calls)
        self.assertIn(("decode", True), calls)
        self.assertEqual(next(e for e in events if isinstance(e, RequestReceived)).headers[2], (b":scheme", b"https"))

    def test_answer_headers_frames_match_h2s_own(self) -> None:
        """answer_headers_frames writes the bytes h2's send_headers writes and leaves the same states behind."""
        from h2.exceptions import StreamClosedError
        from hpack import Encoder

        def server_with_request(client: Any) -> Any:
            server = compat_h2.H2Connection(H2Configuration(client_side=False, header_encoding=None))
            server.initiate_connection()
            server.receive_data(client)
            server.data_to_send()
            return server

        def machine(conn: Any, stream: int) -> Any:
            m = conn.streams[stream].state_machine
            return (m.state, m.headers_sent, m.trailers_sent, m.stream_closed_by)

        client = compat_h2.H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        # Streams 1 and 3 still open (a body may follow), 5 and 7 ended by the client.
        for stream in (1, 3, 5, 7):
            get = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")]
            client.send_headers(stream, get, end_stream=stream > 3)
        request = client.data_to_send()
        fields = [(b":status", b"200"), (b"x-big", b"v" * 40000)]  # over one frame: CONTINUATIONs too
        for end in (True, False):
            ours, theirs = server_with_request(request), server_with_request(request)
            for stream, extra in ((1, []), (3, fields[1:]), (5, []), (7, fields[1:])):
                frames = compat_h2.answer_headers_frames(ours, stream, fields[:1] + extra, Encoder(), end)
                theirs.encoder = Encoder()
                theirs.send_headers(stream, fields[:1] + extra, end_stream=end)
                self.assertEqual(frames, theirs.data_to_send())
                self.assertEqual(machine(ours, stream), machine(theirs, stream))
            self.assertEqual(ours.state_machine.state, theirs.state_machine.state)
            if not end:
                ours.send_data(1, b"body", end_stream=True)  # h2 takes the stream's DATA after our HEADERS
                ours.send_data(5, b"body", end_stream=True)
        self.assertIsNone(compat_h2.answer_headers_frames(ours, 99, fields[:1], Encoder(), True))
        ours.streams[1].state_machine.process_input(compat_h2.StreamInputs.SEND_RST_STREAM)
        with self.assertRaises(StreamClosedError):
            compat_h2.answer_headers_frames(ours, 1, fields[:1], Encoder(), True)

    def test_data_frame_header_matches_h2s_own(self) -> None:
        """data_frame_header gives h2's DATA frame bytes and leaves the same states and windows behind."""
        from hpack import Encoder

        client = compat_h2.H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        for stream in (1, 3):  # 1 still open (a body may follow), 3 ended by the client
            get = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")]
            client.send_headers(stream, get, end_stream=stream == 3)
        request = client.data_to_send()
        twins = []
        for _ in range(2):
            server = compat_h2.H2Connection(H2Configuration(client_side=False, header_encoding=None))
            server.initiate_connection()
            server.receive_data(request)
            server.encoder = Encoder()
            server.send_headers(1, [(b":status", b"200")])
            server.send_headers(3, [(b":status", b"200")])
            server.data_to_send()
            twins.append(server)
        ours, theirs = twins
        for stream in (1, 3):
            for data, end in ((b"a" * 1000, False), (b"", False), (b"b" * 500, True)):
                header = compat_h2.data_frame_header(ours, stream, data, end)
                theirs.send_data(stream, data, end_stream=end)
                self.assertEqual(header + data if header is not None else None, theirs.data_to_send())
                mine, h2s = ours.streams[stream].state_machine, theirs.streams[stream].state_machine
                self.assertEqual((mine.state, mine.stream_closed_by), (h2s.state, h2s.stream_closed_by))
                self.assertEqual(ours.outbound_flow_control_window, theirs.outbound_flow_control_window)
                self.assertEqual(
                    ours.streams[stream].outbound_flow_control_window,
                    theirs.streams[stream].outbound_flow_control_window,
                )
        self.assertEqual(ours.state_machine.state, theirs.state_machine.state)
        self.assertIsNone(compat_h2.data_frame_header(ours, 99, b"x", False))
        client.send_headers(5, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")])
        ours.receive_data(client.data_to_send())
        self.assertIsNone(compat_h2.data_frame_header(ours, 5, b"x" * 70000, False), "past the 64 KiB window")

    def test_receive_request_headers_matches_h2s_own(self) -> None:
        """receive_request_headers gives h2's RequestReceived fields and leaves h2's state as receive_data does."""
        from h2.exceptions import ProtocolError
        from hpack import Encoder

        def server() -> Any:
            conn = compat_h2.StreamErrorConnection(
                H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False)
            )
            conn.initiate_connection()
            conn.increment_flow_control_window(100_000)
            conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 200_000, SettingCodes.MAX_CONCURRENT_STREAMS: 4})
            conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x01\x00\x00\x00\x00")
            return conn

        def state(conn: Any) -> Any:
            streams = {
                i: (
                    s.state_machine.state,
                    s.state_machine.client,
                    s.state_machine.headers_received,
                    s.state_machine.stream_closed_by,
                    s.inbound_flow_control_window,
                    s.outbound_flow_control_window,
                    s.max_outbound_frame_size,
                    s._expected_content_length,
                )
                for i, s in conn.streams.items()
            }
            return (conn.state_machine.state, conn.highest_inbound_stream_id, streams, dict(conn._closed_streams))

        encoder = Encoder()
        get = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"a")]
        post = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"), (b"content-length", b"3")]
        cookies = [*get, (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")]
        ours, theirs = server(), server()
        self.assertFalse(compat_h2.inbound_ready(ours), "no request yet: h2 is not serving")
        first = _headers(1, encoder.encode(get), True).serialize()
        for conn in (ours, theirs):  # the first request, through h2: its state machine is then SERVER_OPEN
            conn.receive_data(first)
        self.assertTrue(compat_h2.inbound_ready(ours))
        for stream, fields, end in ((3, get, True), (5, post, False), (9, cookies, True)):
            block = encoder.encode(fields)  # the same bytes to both: their decoders stay in step
            got = compat_h2.receive_request_headers(ours, stream, block, end)
            events = theirs.receive_data(_headers(stream, block, end).serialize())
            self.assertEqual(got, next(e for e in events if isinstance(e, RequestReceived)).headers)
            self.assertEqual(state(ours), state(theirs))
            self.assertEqual(ours.data_to_send(), theirs.data_to_send())
        # The Content-Length h2 checks DATA against is in place: three bytes end stream 5, four break it.
        for conn in (ours, theirs):
            self.assertEqual(conn._receive_data_frame(DataFrame(5, data=b"ab"))[1][0].data, b"ab")
            with self.assertRaises(NotImplementedError):  # StreamErrorConnection's hook: the body-length error
                conn._receive_data_frame(DataFrame(5, data=b"cd"))
        # Left to h2: an even or a stale stream id, a fifth open stream (the limit is 4: 1, 3, 5, 9).
        for stream in (10, 7, 11):
            self.assertIsNone(compat_h2.receive_request_headers(ours, stream, b"\x82", True))
        self.assertEqual(state(ours), state(theirs))
        # Once one has closed there is room, and the closed stream moves out of h2's table as h2 moves it.
        for conn in (ours, theirs):
            conn.reset_stream(1)
        block = encoder.encode(get)
        got = compat_h2.receive_request_headers(ours, 11, block, True)
        events = theirs.receive_data(_headers(11, block, True).serialize())
        self.assertEqual(got, next(e for e in events if isinstance(e, RequestReceived)).headers)
        self.assertEqual(state(ours), state(theirs))
        self.assertNotIn(1, ours.streams)
        # Errors leave h2's GOAWAY queued and raise, as receive_data does: a bad block, a bad
        # Content-Length, a request shaped as an informational answer.
        cases: list[Any] = [b"\xff\xff\xff", [*post[:3], (b"content-length", b"x")], [(b":status", b"100")]]
        for case in cases:
            ours, theirs = server(), server()
            fresh = Encoder()
            first = _headers(1, fresh.encode(get), True).serialize()
            for conn in (ours, theirs):
                conn.receive_data(first)
                conn.data_to_send()
            block = case if isinstance(case, bytes) else fresh.encode(case)
            with self.assertRaises(ProtocolError) as mine:
                compat_h2.receive_request_headers(ours, 3, block, True)
            with self.assertRaises(ProtocolError) as h2s:
                theirs.receive_data(_headers(3, block, True).serialize())
            self.assertEqual(type(mine.exception), type(h2s.exception))
            self.assertEqual(ours.data_to_send(), theirs.data_to_send())
            self.assertEqual(ours.state_machine.state, theirs.state_machine.state)
            self.assertIsNone(compat_h2.receive_request_headers(ours, 5, b"\x82", True), "the connection is closed")

    def test_receive_data_frame_matches_h2s_own(self) -> None:
        """receive_data_frame leaves h2's windows, body count and stream states as receive_data leaves them."""
        from hpack import Encoder
        from hyperframe.frame import DataFrame

        def server() -> Any:
            conn = compat_h2.StreamErrorConnection(H2Configuration(client_side=False, header_encoding=None))
            conn.initiate_connection()
            conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return conn

        def state(conn: Any) -> Any:
            streams = {
                i: (
                    s.state_machine.state,
                    s.state_machine.stream_closed_by,
                    s.inbound_flow_control_window,
                    s._actual_content_length,
                )
                for i, s in conn.streams.items()
            }
            return conn.state_machine.state, conn.inbound_flow_control_window, streams

        encoder = Encoder()
        post = [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"a")]
        heads = b"".join(
            _headers(stream, encoder.encode(post + extra), False).serialize()
            for stream, extra in ((1, []), (3, [(b"content-length", b"5")]), (5, []))
        )
        ours, theirs = server(), server()
        for conn in (ours, theirs):
            conn.receive_data(heads)
            conn.send_headers(5, [(b":status", b"200")], end_stream=True)  # 5: HALF_CLOSED_LOCAL
            conn.data_to_send()
        frames = [(1, b"abc", False), (3, b"ab", False), (1, b"", True), (3, b"cde", True), (5, b"xy", True)]
        for stream, data, end in frames:
            self.assertTrue(compat_h2.receive_data_frame(ours, stream, len(data), end))
            frame = DataFrame(stream, data=data)
            if end:
                frame.flags.add("END_STREAM")
            theirs.receive_data(frame.serialize())
            self.assertEqual(state(ours), state(theirs))
        # Left to h2: a stream that has ended, one never opened, data past the Content-Length or a window.
        seven = _headers(7, encoder.encode([*post, (b"content-length", b"2")]), False).serialize()
        for conn in (ours, theirs):
            conn.receive_data(seven)
        before = state(ours)
        for stream, length, end in ((1, 1, False), (9, 1, False), (7, 3, False), (7, 1, True), (7, 70_000, False)):
            self.assertFalse(compat_h2.receive_data_frame(ours, stream, length, end))
        self.assertEqual(state(ours), before)

    def test_inbound_ready_follows_h2s_buffer(self) -> None:
        """inbound_ready is false while h2 holds a partial frame, part of the preface or an open header block."""
        from hpack import Encoder

        conn = compat_h2.H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM")
        self.assertFalse(compat_h2.inbound_ready(conn))
        conn.receive_data(b"\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        self.assertFalse(compat_h2.inbound_ready(conn), "not serving before the first request")
        encoder = Encoder()
        get = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"a")]
        conn.receive_data(_headers(1, encoder.encode(get), True).serialize())
        self.assertTrue(compat_h2.inbound_ready(conn))
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
        conn.receive_data(ping[:12])
        self.assertFalse(compat_h2.inbound_ready(conn), "part of a frame")
        conn.receive_data(ping[12:])
        self.assertTrue(compat_h2.inbound_ready(conn))
        open_block = _headers(3, encoder.encode(get), True)
        open_block.flags.discard("END_HEADERS")
        conn.receive_data(open_block.serialize())
        self.assertFalse(compat_h2.inbound_ready(conn), "an open header block")
        conn.receive_data(b"\x00\x00\x00\x09\x04\x00\x00\x00\x03")
        self.assertTrue(compat_h2.inbound_ready(conn))
        conn.close_connection()
        self.assertFalse(compat_h2.inbound_ready(conn), "closed")

    def test_hpack_tables(self) -> None:
        """hpack's static table and Huffman coder are RFC 7541's (Appendix A; the example in C.4.1)."""
        table = compat_h2.hpack_static_table()
        self.assertEqual(
            (len(table), table[0], table[7], table[60]),
            (61, (b":authority", b""), (b":status", b"200"), (b"www-authenticate", b"")),
        )
        self.assertEqual(compat_h2.hpack_huffman()(b"www.example.com").hex(), "f1e3c2e5f23a6ba0ab90f4ff")


class H2DecoderLimitCanaryTests(SynchronousTestCase):
    """h2.py sets conn.decoder.max_header_list_size (public in name, undocumented): see tlsproxy/http/h2.py."""

    def test_decoder_limit_is_enforced(self) -> None:
        """A header block decoding past the decoder's max_header_list_size is refused by h2."""
        from h2.exceptions import ProtocolError

        client = compat_h2.H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        server = compat_h2.H2Connection(H2Configuration(client_side=False))
        server.initiate_connection()
        server.decoder.max_header_list_size = 100
        server.receive_data(client.data_to_send())
        headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a"), ("x", "v" * 200)]
        client.send_headers(1, headers, end_stream=True)
        with self.assertRaises(ProtocolError):
            server.receive_data(client.data_to_send())


class AcmeCanaryTests(SynchronousTestCase):
    """acme: see tlsproxy/compat/acme.py if these fail."""

    def test_send_request_hook_sees_responses(self) -> None:
        """Every response passes through _send_request, where Retry-After is kept."""

        class Adapter(requests.adapters.BaseAdapter):
            def send(self, request: Any, **kwargs: Any) -> requests.Response:
                response = requests.Response()
                response.status_code = 200
                response.headers["Retry-After"] = "120"
                response.headers["Content-Type"] = "application/json"
                response._content = b"{}"
                response.url = request.url
                return response

            def close(self) -> None:
                pass

        net = compat_acme.RetryingNetwork(key=None)
        net.session.mount("https://", Adapter())
        net.get("https://ca.test/directory")
        self.assertEqual(net.last_retry_after, "120")

    def test_post_once_is_the_single_attempt(self) -> None:
        """ClientNetwork.post is _post_once with a retry: our post retries _post_once on badNonce."""
        self.assertIn("self._post_once(", inspect.getsource(acme_client.ClientNetwork.post))
        attempts = []

        class Net(compat_acme.RetryingNetwork):
            def _post_once(self, *args: Any, **kwargs: Any) -> Any:
                attempts.append(args)
                if len(attempts) < 3:
                    raise acme_client.messages.Error(typ="urn:ietf:params:acme:error:badNonce")
                return "response"

        self.assertEqual(Net(key=None).post("https://ca.test/x", None), "response")
        self.assertEqual(len(attempts), 3)

    def test_signed_post_goes_through_the_network(self) -> None:
        """ClientV2._post hands the URL and body to the network's post."""
        posted = []

        class Net(acme_client.ClientNetwork):
            def post(self, *args: Any, **kwargs: Any) -> Any:
                posted.append(args[:2])
                return "response"

        directory = acme_client.messages.Directory.from_json({"newNonce": "https://ca.test/nonce"})
        client = acme_client.ClientV2(directory, Net(key=None))
        self.assertEqual(compat_acme.signed_post(client, "https://ca.test/order", None), "response")
        self.assertEqual(posted, [("https://ca.test/order", None)])
