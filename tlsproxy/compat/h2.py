"""h2's private parts: the per-frame handler for DATA, the HPACK decoder it calls, and hpack's tables.

Tested with h2 4.1 to 4.4.  h2 raises a body-length error from inside its
frame loop, where every ProtocolError ends the connection; RFC 9113 (8.1.1)
makes it a stream error, and the only place to catch it for one stream is
the DATA frame's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from h2.connection import H2Connection
from h2.exceptions import InvalidBodyLengthError


class StreamErrorConnection(H2Connection):
    """An H2Connection that hands a DATA frame breaking its stream's Content-Length to a method.

    ``body_length_error(frame)`` returns what the frame handler returns:
    (frames to send, events).
    """

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            result: tuple[list[Any], list[Any]] = super()._receive_data_frame(frame)  # type: ignore[misc]
        except InvalidBodyLengthError:
            return self.body_length_error(frame)
        return result

    def body_length_error(self, frame: Any) -> tuple[list[Any], list[Any]]:
        raise NotImplementedError


def use_decoder(conn: H2Connection, decoder: Any) -> None:
    """Have ``conn`` decode header blocks with ``decoder``.

    h2 keeps its hpack Decoder in ``conn.decoder`` and calls only
    ``decode(block, raw=True)`` on it, setting ``max_header_list_size`` and
    ``max_allowed_table_size`` as settings are acknowledged: any object with
    those serves.
    """
    conn.decoder = decoder


def hpack_static_table() -> tuple[tuple[bytes, bytes], ...]:
    """HPACK's static table (RFC 7541 Appendix A), entry 1 first, as hpack keeps it."""
    from hpack.table import HeaderTable

    return tuple(HeaderTable.STATIC_TABLE)


def hpack_huffman() -> Callable[[bytes], bytes]:
    """HPACK's Huffman coder (RFC 7541 Appendix B), as hpack's encoder uses it."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    return HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode  # type: ignore[return-value]
