# The C accelerator (tlsproxy/_speedups.c); each function is the pure Python
# one named in tlsproxy/speedups.py, with the same signature.
from tlsproxy.http.exchange import Headers, RequestHead

def configure(
    request_head: type[RequestHead], request_error: type[Exception], response_error: type[Exception]
) -> bool: ...
def parse_request_head(head: bytes, max_header_count: int) -> tuple[RequestHead, bool]: ...
def parse_response_head(head: bytes) -> tuple[int, bytes, bytes, int | None, bool, bool]: ...
def response_block(block: bytes, hsts: bytes | None, secure_cookies: bool, keep_upgrade: bool = ...) -> bytes: ...
def upstream_request_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Headers,
    client_address: str,
    scheme: bytes,
    server_port: int,
    trusted: bool,
    upgrade: bytes,
    framing: bytes | None,
) -> bytes: ...
