"""Static and media files: path safety, conditional requests, ranges, codings, cache headers, streaming."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import zstandard
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_proxy_handler import FakeExchange
from tests.unit.test_reqbuffer import FakeThreads
from tlsproxy import config, preflight
from tlsproxy.config import HSTS, Server, Site, StaticDir, parse_upstream
from tlsproxy.http.exchange import RequestHead
from tlsproxy.proxy import static
from tlsproxy.proxy.handler import ProxyHandler
from tlsproxy.proxy.static import FileInfo, Refused, accepted_codings, byte_range, not_modified, relative_parts

# Every way we know to climb out of the root, or to name what must not be served.
TRAVERSALS = [
    b"../etc/passwd",
    b"../../../../etc/passwd",
    b"admin/../../etc/passwd",
    b"%2e%2e/etc/passwd",
    b"%2E%2E/etc/passwd",
    b".%2e/etc/passwd",
    b"%2e./etc/passwd",
    b"..%2fetc%2fpasswd",
    b"..%2Fetc%2Fpasswd",
    b"%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"..%5cetc%5cpasswd",
    b"..%5Cetc%5Cpasswd",
    b"..\\etc\\passwd",
    b"admin\\..\\..\\etc\\passwd",
    b"%252e%252e/etc/passwd",
    b"%252e%252e%252fetc%252fpasswd",
    b"..%252fetc%252fpasswd",
    b"passwd%00.css",
    b"a.css%00",
    b"a\x00.css",
    b"%c0%ae%c0%ae/etc/passwd",
    b"./admin/base.css",
    b"/etc/passwd",
    b"//etc/passwd",
    b"admin//base.css",
    b".env",
    b".git/config",
    b"admin/.htaccess",
    b"%2egit/config",
    b"admin/",
    b"",
    b"a%0d%0aSet-Cookie:x.css",
    b"%2fetc%2fpasswd",
]


@pytest.mark.parametrize("rest", TRAVERSALS)
def test_traversals_are_refused(rest: bytes) -> None:
    """No encoding of .., separators, NUL, dotfiles or directories yields a path to join under the root."""
    with pytest.raises(Refused) as info:
        relative_parts(rest)
    assert info.value.status in (400, 404)


@pytest.mark.parametrize("rest", [b"%zz.css", b"a%2.css", b"a%"])
def test_malformed_escapes_are_400(rest: bytes) -> None:
    """A broken percent escape is a bad request, not a file name."""
    with pytest.raises(Refused) as info:
        relative_parts(rest)
    assert info.value.status == 400


def test_plain_and_encoded_names_resolve() -> None:
    """Ordinary names, UTF-8 and spaces decode once into segments."""
    assert relative_parts(b"admin/css/base.3f1c2a9b7d0e.css") == ["admin", "css", "base.3f1c2a9b7d0e.css"]
    assert relative_parts(b"uploads/caf%C3%A9%20menu.pdf") == ["uploads", "café menu.pdf"]
    assert relative_parts(b"a..b.css") == ["a..b.css"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        (b"gzip", ["gzip"]),
        (b"gzip, deflate, br, zstd", ["br", "zstd", "gzip"]),
        (b"gzip;q=1.0, br;q=0.5", ["gzip", "br"]),
        (b"br;q=0, gzip", ["gzip"]),
        (b"*", ["br", "zstd", "gzip"]),
        (b"*;q=0.5, gzip;q=0", ["br", "zstd"]),
        (b"identity", []),
        (b"zstd;q=0.9, gzip;q=0.9", ["zstd", "gzip"]),
        (b"gzip;q=nonsense, br", ["br"]),
        (b"GZIP ; Q=0.3", ["gzip"]),
        (b"x-gzip", ["gzip"]),
        (b"br;q=0, br", []),  # named twice: the refusal holds, as for compressed answers
        (b"gzip, x-gzip;q=0", []),
        (b"gzip;q=0.5, br;q=0.9, br;q=0.1", ["gzip", "br"]),
    ],
)
def test_accept_encoding_ranks_by_q_then_ours(header: bytes | None, expected: list[str]) -> None:
    """Accept-Encoding's q-values pick the coding; q=0 refuses one; ties go br, zstd, gzip."""
    assert accepted_codings(header) == expected


INFO = FileInfo(size=1000, mtime=1_700_000_000.5, mtime_ns=1_700_000_000_500_000_000)


def test_conditional_requests() -> None:
    """If-None-Match (weak compare, *, lists) decides before If-Modified-Since; dates compare by second."""
    assert not_modified(INFO, INFO.etag, None)
    assert not_modified(INFO, b'"nope", W/' + INFO.etag, None)
    assert not_modified(INFO, b"*", None)
    assert not not_modified(INFO, b'"nope"', INFO.last_modified)  # If-None-Match wins
    assert not_modified(INFO, None, INFO.last_modified)
    assert not_modified(INFO, None, b"Fri, 01 Jan 2100 00:00:00 GMT")
    assert not not_modified(INFO, None, b"Sat, 01 Jan 2000 00:00:00 GMT")
    assert not not_modified(INFO, None, b"yesterday")
    assert not not_modified(INFO, None, None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"bytes=0-99", (0, 99)),
        (b"bytes=900-", (900, 999)),
        (b"bytes=-100", (900, 999)),
        (b"bytes=-5000", (0, 999)),
        (b"bytes=990-5000", (990, 999)),
        (b"bytes=1000-", False),
        (b"bytes=-0", False),
        (b"bytes=5-1", None),
        (b"bytes=0-1,5-6", None),
        (b"items=0-1", None),
        (b"bytes=a-b", None),
        (b"bytes=-", None),
    ],
)
def test_byte_ranges(header: bytes | None, expected: Any) -> None:
    """One range is served; past the end is 416 (False); several or malformed ones get the whole file."""
    assert byte_range(header, None, INFO) == expected


def test_if_range() -> None:
    """If-Range with the current ETag or date keeps the range; anything else gets the whole file."""
    assert byte_range(b"bytes=0-9", INFO.etag, INFO) == (0, 9)
    assert byte_range(b"bytes=0-9", INFO.last_modified, INFO) == (0, 9)
    assert byte_range(b"bytes=0-9", b'"old"', INFO) is None
    assert byte_range(b"bytes=0-9", b"W/" + INFO.etag, INFO) is None  # strong comparison only
    assert byte_range(b"bytes=0-9", b"Sat, 01 Jan 2000 00:00:00 GMT", INFO) is None


def test_cache_control_and_types() -> None:
    """Hashed static names are immutable for a year; others (and all media) get the short max-age."""
    plain = StaticDir("/static/", "/srv")
    media = StaticDir("/media/", "/srv", media=True)
    assert static.cache_control(plain, "base.3f1c2a9b7d0e.css", 60) == b"public, max-age=31536000, immutable"
    assert static.cache_control(plain, "base.css", 60) == b"public, max-age=60"
    assert static.cache_control(plain, "base.3f1c2a9b.css", 60) == b"public, max-age=60"
    assert static.cache_control(media, "photo.3f1c2a9b7d0e.png", 60) == b"public, max-age=60"
    assert static.content_type("a.css") == "text/css; charset=utf-8"
    assert static.content_type("a.JS") == "text/javascript; charset=utf-8"
    assert static.content_type("a.woff2") == "font/woff2"
    assert static.content_type("a.svg") == "image/svg+xml"
    assert static.content_type("noext") == "application/octet-stream"


def write(path: Path, data: bytes, mtime: float = 1_700_000_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


class ServeTests(SynchronousTestCase):
    """Through ProxyHandler.handle, as a request arrives (threads run inline: MemoryReactorClock has none)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.tmp = Path(self.mktemp()).absolute()
        self.root = self.tmp / "staticfiles"
        self.media = self.tmp / "media"
        self.css = b"body { color: #123 }\n" * 50
        write(self.root / "admin/css/base.3f1c2a9b7d0e.css", self.css)
        write(self.root / "admin/css/base.3f1c2a9b7d0e.css.gz", b"GZ" + self.css[:10])
        write(self.root / "admin/css/base.3f1c2a9b7d0e.css.br", b"BR" + self.css[:10])
        write(self.root / "plain.txt", b"hello")
        write(self.root / ".secret", b"no")
        write(self.media / "evil.html", b"<script>alert(1)</script>")
        write(self.media / "evil.svg", b"<svg onload=alert(1)>")
        write(self.media / "photo.png", b"\x89PNG")
        write(self.tmp / "outside.txt", b"OUTSIDE")
        (self.root / "escape.txt").symlink_to(self.tmp / "outside.txt")
        mounts = (
            StaticDir("/static/", str(self.root)),
            StaticDir("/media/", str(self.media), media=True),
        )
        self.handler = self.make_handler(mounts)

    def make_handler(self, mounts: tuple[StaticDir, ...]) -> ProxyHandler:
        site = Site(
            hosts=("app.test",),
            upstream=parse_upstream("http://127.0.0.1:8000"),
            hsts=HSTS(max_age=60),
            static=mounts,
            static_max_age=120,
        )
        return ProxyHandler(self.reactor, [site], Server(send_timeout=10))

    def get(self, target: bytes, method: bytes = b"GET", **fields: bytes) -> FakeExchange:
        headers = [(b"host", b"app.test"), *((k.replace("_", "-").encode(), v) for k, v in fields.items())]
        exchange = FakeExchange(RequestHead(method, target, b"2", b"app.test", headers))
        self.handler.handle(exchange)
        return exchange

    def field(self, exchange: FakeExchange, name: bytes) -> bytes | None:
        return dict(exchange.headers).get(name)

    def test_serves_a_hashed_css_file(self) -> None:
        """A file under the prefix comes back 200 with its bytes, type, validators, a year's cache and HSTS."""
        got = self.get(b"/static/admin/css/base.3f1c2a9b7d0e.css")
        self.assertEqual((got.status, got.body, got.finished), (200, self.css, True))
        self.assertEqual(self.field(got, b"content-type"), b"text/css; charset=utf-8")
        self.assertEqual(self.field(got, b"cache-control"), b"public, max-age=31536000, immutable")
        self.assertEqual(self.field(got, b"last-modified"), b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(self.field(got, b"strict-transport-security"), b"max-age=60")
        self.assertEqual(self.field(got, b"vary"), b"Accept-Encoding")
        self.assertIsNone(self.field(got, b"content-encoding"))
        self.assertEqual(self.reactor.tcpClients, [])  # the app was never asked

    def test_no_hsts_over_plain_http(self) -> None:
        """HSTS goes only on HTTPS answers, as for proxied ones."""
        exchange = FakeExchange(RequestHead(b"GET", b"/static/plain.txt", b"1.1", b"app.test", []))
        exchange.secure = False
        self.handler.handle(exchange)
        self.assertEqual(exchange.status, 200)
        self.assertIsNone(self.field(exchange, b"strict-transport-security"))

    def test_a_failure_in_a_thread_is_a_500(self) -> None:
        """An unexpected error once the file is open is logged and answered 500, never left hanging."""

        def broken(*args: Any) -> None:
            raise RuntimeError("disk on fire")

        self.patch(static, "file_headers", broken)
        got = self.get(b"/static/plain.txt?fresh")
        self.assertEqual((got.status, got.finished), (500, True))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_head_sends_no_body(self) -> None:
        """HEAD has the GET's fields and no body."""
        got = self.get(b"/static/plain.txt", b"HEAD")
        self.assertEqual((got.status, got.body, got.finished), (200, b"", True))
        self.assertEqual(self.field(got, b"cache-control"), b"public, max-age=120")
        self.assertEqual(self.field(got, b"content-type"), b"text/plain; charset=utf-8")

    def test_revalidation_is_304(self) -> None:
        """The ETag and the Last-Modified of a first answer each make the next one a 304 without a body."""
        first = self.get(b"/static/plain.txt")
        etag = self.field(first, b"etag")
        assert etag is not None
        again = self.get(b"/static/plain.txt", if_none_match=etag)
        self.assertEqual((again.status, again.body, self.field(again, b"etag")), (304, b"", etag))
        since = self.field(first, b"last-modified")
        assert since is not None
        self.assertEqual(self.get(b"/static/plain.txt", if_modified_since=since).status, 304)
        self.assertEqual(self.get(b"/static/plain.txt", if_none_match=b'"other"').status, 200)

    def test_ranges(self) -> None:
        """A range is 206 with Content-Range; past the end 416; a stale If-Range gets the whole file."""
        got = self.get(b"/static/plain.txt", range=b"bytes=1-3")
        self.assertEqual((got.status, got.body, self.field(got, b"content-range")), (206, b"ell", b"bytes 1-3/5"))
        got = self.get(b"/static/plain.txt", range=b"bytes=9-")
        self.assertEqual((got.status, got.body, self.field(got, b"content-range")), (416, b"", b"bytes */5"))
        got = self.get(b"/static/plain.txt", range=b"bytes=1-3", if_range=b'"stale"')
        self.assertEqual((got.status, got.body), (200, b"hello"))

    def test_precompressed_sibling_by_accept_encoding(self) -> None:
        """The client's best coding with a sibling on disk is sent, with Content-Encoding and its own ETag."""
        target = b"/static/admin/css/base.3f1c2a9b7d0e.css"
        got = self.get(target, accept_encoding=b"gzip, br")
        self.assertEqual((got.body, self.field(got, b"content-encoding")), (b"BR" + self.css[:10], b"br"))
        got = self.get(target, accept_encoding=b"gzip, br;q=0.1")
        self.assertEqual((got.body, self.field(got, b"content-encoding")), (b"GZ" + self.css[:10], b"gzip"))
        self.assertEqual(self.field(got, b"content-type"), b"text/css; charset=utf-8")
        self.assertEqual(self.field(got, b"vary"), b"Accept-Encoding")
        plain = self.get(target, accept_encoding=b"zstd")  # no .zst sibling: coded on the fly (compress.py)
        self.assertEqual(zstandard.ZstdDecompressor().decompress(plain.body), self.css)
        self.assertNotEqual(self.field(plain, b"etag"), self.field(got, b"etag"))

    def test_every_accept_encoding_line_counts(self) -> None:
        """A coding refused in a second Accept-Encoding line is not sent (RFC 9110 5.3), as compress.py reads it."""
        headers = [(b"host", b"app.test"), (b"accept-encoding", b"br"), (b"accept-encoding", b"br;q=0, gzip")]
        target = b"/static/admin/css/base.3f1c2a9b7d0e.css"
        exchange = FakeExchange(RequestHead(b"GET", target, b"2", b"app.test", headers))
        self.handler.handle(exchange)
        self.assertEqual((exchange.body, self.field(exchange, b"content-encoding")), (b"GZ" + self.css[:10], b"gzip"))

    def test_refusals_never_reach_the_app_or_the_disk_outside(self) -> None:
        """Traversals, dotfiles, directories, symlinks out of the root and missing files are 404/400 from us."""
        for target in [
            b"/static/../outside.txt",
            b"/static/%2e%2e/outside.txt",
            b"/static/..%2foutside.txt",
            b"/static/.secret",
            b"/static/admin/",
            b"/static/admin",
            b"/static/escape.txt",
            b"/static/missing.css",
            b"/static/%ff.css",
        ]:
            got = self.get(target)
            self.assertIn(got.status, (400, 404), target)
            self.assertNotIn(b"OUTSIDE", got.body)
            self.assertEqual(self.field(got, b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_symlinks_out_when_allowed(self) -> None:
        """follow_symlinks = true serves a link out of the root (collectstatic --link)."""
        self.handler = self.make_handler((StaticDir("/static/", str(self.root), follow_symlinks=True),))
        self.assertEqual(self.get(b"/static/escape.txt").body, b"OUTSIDE")

    def test_other_methods_are_405(self) -> None:
        """POST to a static prefix is 405 with Allow: GET, HEAD."""
        got = self.get(b"/static/plain.txt", b"POST")
        self.assertEqual((got.status, self.field(got, b"allow")), (405, b"GET, HEAD"))

    def test_uploads_never_render_as_html_or_svg(self) -> None:
        """Media HTML and SVG are downloads; images keep their type; all with nosniff."""
        for name in (b"evil.html", b"evil.svg"):
            got = self.get(b"/media/" + name)
            self.assertEqual(self.field(got, b"content-type"), b"application/octet-stream")
            self.assertEqual(self.field(got, b"content-disposition"), b"attachment")
            self.assertEqual(self.field(got, b"x-content-type-options"), b"nosniff")
        got = self.get(b"/media/photo.png")
        self.assertEqual(self.field(got, b"content-type"), b"image/png")
        self.assertIsNone(self.field(got, b"content-disposition"))
        self.handler = self.make_handler((StaticDir("/media/", str(self.media), media=True, trusted=True),))
        self.assertEqual(self.field(self.get(b"/media/evil.svg"), b"content-type"), b"image/svg+xml")

    def test_other_paths_go_to_the_app(self) -> None:
        """Only the configured prefixes are ours: /staticky/ and /static (no slash) are proxied."""
        self.get(b"/staticky/plain.txt")
        self.get(b"/static")
        self.assertEqual(len(self.reactor.tcpClients), 2)


class StreamingTests(SynchronousTestCase):
    """A large file, with the thread pool under the test's control."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.patch(FakeExchange, "clock", self.reactor)
        self.threads = FakeThreads()
        self.patch(static, "threaded", lambda reactor: self.threads)
        root = Path(self.mktemp()).absolute()
        self.data = bytes(range(256)) * 4096  # 1 MiB
        write(root / "big.bin", self.data)
        site = Site(
            hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"), static=(StaticDir("/s/", str(root)),)
        )
        self.handler = ProxyHandler(self.reactor, [site], Server(send_timeout=10))

    def start(self, **fields: bytes) -> FakeExchange:
        headers = [(b"host", b"app.test"), *((k.encode(), v) for k, v in fields.items())]
        exchange = FakeExchange(RequestHead(b"GET", b"/s/big.bin", b"1.1", b"app.test", headers))
        self.handler.handle(exchange)
        return exchange

    def test_nothing_blocking_runs_on_the_reactor(self) -> None:
        """handle() only queues the stat and open; the answer waits for the thread."""
        got = self.start()
        self.assertEqual((got.status, self.threads.names()), (None, ["open_file"]))
        self.threads.run_one()
        self.assertEqual(got.status, 200)
        self.assertEqual(self.threads.names(), ["_read"])  # chunks are read in threads too

    def test_streams_in_chunks_paced_by_the_client(self) -> None:
        """Paused, no further read is queued; resumed, reading goes on to the whole file, then closes it."""
        got = self.start()
        self.threads.run_one()
        self.threads.run_one()
        self.assertEqual(len(got.body), static.CHUNK)
        got.producer.pauseProducing()
        self.threads.run_all()  # the read queued before the pause: held, not written
        self.assertEqual(self.threads.pending, [])
        self.assertEqual(len(got.body), static.CHUNK)
        got.producer.resumeProducing()
        self.threads.run_all()
        self.assertEqual((got.body, got.finished), (self.data, True))
        self.assertIsNone(got.producer)

    def test_small_files_are_answered_from_memory_for_a_second(self) -> None:
        """A small file just read is served again with no thread hop; after CACHE_SECONDS the disk is asked."""
        root = Path(self.mktemp()).absolute()
        write(root / "a.css", b"one")
        site = Site(hosts=("app.test",), upstream=parse_upstream("http://127.0.0.1:8000"))
        site = dataclasses.replace(site, static=(StaticDir("/c/", str(root)),))
        self.handler = ProxyHandler(self.reactor, [site], Server())

        def fetch() -> FakeExchange:
            exchange = FakeExchange(RequestHead(b"GET", b"/c/a.css", b"1.1", b"app.test", [(b"host", b"app.test")]))
            self.handler.handle(exchange)
            self.threads.run_all()
            return exchange

        self.assertEqual(fetch().body, b"one")
        write(root / "a.css", b"two", mtime=1_800_000_000)
        before = len(static.cache.entries)
        got = fetch()
        self.assertEqual((got.status, got.body, self.threads.pending), (200, b"one", []))
        self.assertEqual(len(static.cache.entries), before)
        self.reactor.advance(static.CACHE_SECONDS + 0.1)
        self.assertEqual(fetch().body, b"two")

    def test_cache_is_bounded(self) -> None:
        """The cache drops its oldest entries past its byte and entry caps."""
        cache = static.FileCache(max_bytes=10, max_entries=2)
        mount = StaticDir("/s/", "/srv")
        for i in range(3):
            cache.put((mount, 0, b"%d" % i, None), 0.0, "x", static.Opened(200, INFO, data=b"abcd"))
        self.assertEqual([k[2] for k in cache.entries], [b"1", b"2"])
        cache.put((mount, 0, b"big", None), 0.0, "x", static.Opened(200, INFO, data=b"0123456789"))
        self.assertEqual(([k[2] for k in cache.entries], cache.bytes), ([b"big"], 10))
        cache.put((mount, 0, b"404", None), 0.0, "x", static.Opened(404))
        self.assertEqual(len(cache.entries), 1)

    def test_range_of_a_large_file(self) -> None:
        """A range deep into a large file reads just that slice."""
        got = self.start(range=b"bytes=500000-500009")
        self.threads.run_all()
        self.assertEqual((got.status, got.body), (206, self.data[500000:500010]))

    def test_client_gone_closes_the_file(self) -> None:
        """A client that leaves mid-file stops the reads and the file is closed (in a thread)."""
        got = self.start()
        self.threads.run_one()
        handle = got.producer.file
        got.observer.client_gone()
        self.threads.run_all()
        self.assertTrue(handle.closed)
        self.assertLess(len(got.body), len(self.data))

    def test_a_client_that_takes_nothing_is_cut(self) -> None:
        """Paused for send_timeout, the connection is aborted and the file closed."""
        got = self.start()
        self.threads.run_one()
        request = got.producer
        request.pauseProducing()
        self.threads.run_all()
        self.reactor.advance(11)
        self.assertTrue(got.aborted)
        self.assertIsNone(request.file)


def parse_site(extra: str, tmp_path: Path) -> Any:
    import tomllib

    text = f'[[site]]\nhosts = ["app.test"]\nupstream = "http://127.0.0.1:8000"\ntls = "local"\n{extra}'
    return config.parse(tomllib.loads(text), str(tmp_path / "t.toml"))


def test_config_shape(tmp_path: Path) -> None:
    """Both forms parse; prefixes are sorted longest first; static_max_age is read."""
    cfg = parse_site(
        'static_max_age = 60\n[site.static]\n"/static/" = "/srv/s"\n"/static/big/" = "/srv/b"\n'
        '"/media/" = { root = "/srv/m/", media = true }\n',
        tmp_path,
    )
    (site,) = cfg.sites
    assert [d.prefix for d in site.static] == ["/static/big/", "/static/", "/media/"]
    assert site.static[2] == StaticDir("/media/", "/srv/m", media=True)
    assert site.static_max_age == 60


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('static = { "static/" = "/srv/s" }', "starts and ends with /"),
        ('static = { "/static" = "/srv/s" }', "starts and ends with /"),
        ('static = { "/a/../b/" = "/srv/s" }', "starts and ends with /"),
        ('static = { "/" = "/srv/s" }', "whole site"),
        ('static = { "/static/" = "srv/s" }', "absolute path"),
        ('static = { "/static/" = 3 }', "directory path or a table"),
        ('static = { "/m/" = { media = true } }', "needs root"),
        ('static = { "/m/" = { root = "/srv", colour = "red" } }', "unknown key"),
        ('static = { "/m/" = { root = "/srv", trusted = true } }', "only to media"),
        ('static = "/srv"', "expected a table"),
        ("static_max_age = -1", "static_max_age"),
    ],
)
def test_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    """Each mistake is an error naming the file, the key and what is wrong."""
    with pytest.raises(config.ConfigError) as info:
        parse_site(extra, tmp_path)
    text = str(info.value)
    assert message in text and "t.toml" in text and "site[0].static" in text


def test_missing_directory_is_a_warning(tmp_path: Path) -> None:
    """A static root not there (yet) is a warning for `check`, naming the file, key and directory."""
    (tmp_path / "here").mkdir()
    cfg = parse_site(f'static = {{ "/static/" = "{tmp_path}/gone", "/m/" = "{tmp_path}/here" }}', tmp_path)
    (warning,) = preflight.static_warnings(cfg)
    assert "t.toml" in warning and 'site[0].static."/static/"' in warning and "does not exist" in warning


def test_check_describes_the_static_prefixes(tmp_path: Path) -> None:
    """`tlsproxy check` lists each static prefix, its directory and whether it holds uploads."""
    from tlsproxy import cli

    cfg = parse_site('static = { "/static/" = "/srv/s", "/media/" = { root = "/srv/m", media = true } }', tmp_path)
    text = cli.describe(cfg)
    assert "static /static/ = /srv/s, max-age 3600s unless hashed" in text
    assert "static /media/ = /srv/m (media: uploads)" in text
