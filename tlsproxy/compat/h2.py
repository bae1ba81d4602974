"""h2's private parts: the per-frame handler for DATA, the HPACK decoder it calls, its state machines, hpack's tables.

Tested with h2 4.1 to 4.4.  h2 raises a body-length error from inside its
frame loop, where every ProtocolError ends the connection; RFC 9113 (8.1.1)
makes it a stream error, and the only place to catch it for one stream is
the DATA frame's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from h2.connection import ConnectionInputs, H2Connection
from h2.exceptions import InvalidBodyLengthError
from h2.stream import StreamInputs

_HEADERS, _CONTINUATION = b"\x01", b"\x09"
_END_STREAM, _END_HEADERS = 0x1, 0x4


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


def answer_headers_frames(
    conn: H2Connection, stream_id: int, fields: Any, encoder: Any, end_stream: bool
) -> bytes | None:
    """The HEADERS (and CONTINUATION) frames of a final answer, h2's state moved as its send_headers moves it.

    h2's send_headers re-encodes our bytes as UTF-8, builds frame objects and
    serialises them: a quarter of an HTTP/2 request's cost.  Here the same
    state transitions run (the connection's, then the stream's, then
    END_STREAM), then ``encoder`` encodes, as in h2, and the frames are
    written as bytes.  They are returned, not queued: the caller writes them
    after what h2 holds.  None (nothing done) for a stream h2 no longer
    holds: its own path raises what it should there.
    """
    stream = conn.streams.get(stream_id)
    if stream is None:
        return None
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    block = encoder.encode(fields)
    size = conn.max_outbound_frame_size
    sid = stream_id.to_bytes(4, "big")
    first = _END_STREAM if end_stream else 0
    if len(block) <= size:
        return len(block).to_bytes(3, "big") + _HEADERS + bytes((first | _END_HEADERS,)) + sid + block
    parts = []
    for start in range(0, len(block), size):
        chunk = block[start : start + size]
        last = start + size >= len(block)
        kind = _HEADERS if start == 0 else _CONTINUATION
        flags = (first if start == 0 else 0) | (_END_HEADERS if last else 0)
        parts.append(len(chunk).to_bytes(3, "big") + kind + bytes((flags,)) + sid + chunk)
    return b"".join(parts)


def data_frame_header(conn: H2Connection, stream_id: int, data: bytes, end_stream: bool) -> bytes | None:
    """The 9-byte header of a DATA frame carrying ``data``, h2's state and windows moved as its send_data moves them.

    The frame's bytes are the caller's to write (header, then ``data``),
    after what h2 holds.  None (nothing done) where h2's own send_data must
    decide: a stream it no longer holds, or ``data`` past a window or the
    frame size.
    """
    stream = conn.streams.get(stream_id)
    size = len(data)
    if (
        stream is None
        or size > conn.outbound_flow_control_window
        or size > stream.outbound_flow_control_window
        or size > conn.max_outbound_frame_size
    ):
        return None
    conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    return size.to_bytes(3, "big") + (b"\x00\x01" if end_stream else b"\x00\x00") + stream_id.to_bytes(4, "big")


def hpack_static_table() -> tuple[tuple[bytes, bytes], ...]:
    """HPACK's static table (RFC 7541 Appendix A), entry 1 first, as hpack keeps it."""
    from hpack.table import HeaderTable

    return tuple(HeaderTable.STATIC_TABLE)


def hpack_huffman() -> Callable[[bytes], bytes]:
    """HPACK's Huffman coder (RFC 7541 Appendix B), as hpack's encoder uses it."""
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    return HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode  # type: ignore[return-value]
