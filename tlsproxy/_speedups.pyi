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
def configure_hpack(
    decoding_error: type[Exception],
    invalid_index: type[Exception],
    oversized_list: type[Exception],
    invalid_table_size: type[Exception],
) -> None: ...

class HpackDecoder:
    """hpack.Decoder's interface, raw bytes only."""

    max_header_list_size: int
    max_allowed_table_size: int
    header_table_size: int
    @property
    def dynamic_entries(self) -> list[tuple[bytes, bytes]]: ...
    def __init__(self, max_header_list_size: int = ...) -> None: ...
    def decode(self, data: bytes, raw: bool = ...) -> list[tuple[bytes, bytes]]: ...
