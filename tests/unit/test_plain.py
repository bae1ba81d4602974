"""The port-80 side: ACME tokens answered, known hosts redirected, nothing else."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.certs.challenges import HTTP01Answers
from tlsproxy.http.plain import PlainHTTPHandler
from tlsproxy.http.server import HTTP11ServerProtocol, Limits
from tlsproxy.http.wire import redirect_location


class PlainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.answers = HTTP01Answers()
        self.handler = PlainHTTPHandler(self.answers, lambda host: host in ("example.com", "www.example.com"), 443)

    def request(self, raw: bytes) -> bytes:
        proto = HTTP11ServerProtocol(self.handler, Clock(), Limits(), secure=False)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(raw)
        return transport.value()

    def test_token_answered(self) -> None:
        """A pending HTTP-01 token is answered with its key authorization."""
        self.answers.put("tok_EN-1", "tok_EN-1.thumbprint")
        out = self.request(b"GET /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(out.endswith(b"\r\n\r\ntok_EN-1.thumbprint"))

    def test_unknown_token_404(self) -> None:
        """An unknown or removed token is 404, never a redirect."""
        self.answers.put("abc", "abc.x")
        self.answers.remove("abc")
        out = self.request(b"GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 404"))

    def test_redirect_keeps_path_and_query(self) -> None:
        """A known host is sent to https with path and query intact."""
        out = self.request(b"GET /a/b?c=d&e HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 301"))
        self.assertIn(b"Location: https://www.example.com/a/b?c=d&e\r\n", out)

    def test_redirect_from_name_goes_straight_to_the_canonical_name(self) -> None:
        """A site's redirect_from name is sent to https on the canonical name: one hop, path and query kept."""
        self.handler.canonical = {"www.example.com": "example.com"}.get
        out = self.request(b"GET /a?b=1 HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        self.assertIn(b"Location: https://example.com/a?b=1\r\n", out)

    def test_host_with_trailing_dot_is_the_same_host(self) -> None:
        """Host: www.example.com. is routed as www.example.com (the absolute form of the same name)."""
        out = self.request(b"GET /a HTTP/1.1\r\nHost: www.example.com.\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 301"))
        self.assertIn(b"Location: https://www.example.com/a\r\n", out)

    def test_post_redirect_keeps_method(self) -> None:
        """Non-GET requests get 308 so the method survives."""
        out = self.request(b"POST /f HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 308"))

    def test_unknown_host_404(self) -> None:
        """Any other Host gets 404: the HTTP port is no open redirect."""
        for host in (b"evil.test", b"example.com.evil.test", b"", b"example.com@evil.test"):
            out = self.request(b"GET //evil.test/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertNotIn(b"Location", out)

    def test_https_port_in_location(self) -> None:
        """A non-default HTTPS port is kept in the Location."""
        self.assertEqual(redirect_location("example.com", 8443, b"/x"), b"https://example.com:8443/x")
        self.assertEqual(redirect_location("::1", 443, b"/"), b"https://[::1]/")
