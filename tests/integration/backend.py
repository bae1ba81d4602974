"""A small threaded HTTP/1.1 app for tests that need one without Django: python backend.py PORT."""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/slow":
            print("slow request started", flush=True)  # a test may wait for this line
            time.sleep(float(query.get("s", ["1"])[0]))
        if url.path == "/stream":
            self.stream(int(query["size"][0]))
            return
        body = f"hello {url.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, size: int) -> None:
        """``size`` bytes of zeros, with a Content-Length, written as fast as the socket takes them."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = bytes(256 * 1024)
        while size > 0:
            self.wfile.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)

    def do_POST(self) -> None:
        """Read the whole body (Content-Length or chunked) and answer with its length."""
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                while size:
                    got = self.rfile.read(min(size, 1 << 20))
                    total += len(got)
                    size -= len(got)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                got = self.rfile.read(min(left, 1 << 20))
                if not got:
                    break
                total += len(got)
                left -= len(got)
        body = f"{total}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("backend ready", flush=True)
    server.serve_forever()
