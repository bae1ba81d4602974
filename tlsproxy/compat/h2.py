"""h2's private parts: the per-frame handler for DATA, the HPACK decoder it calls, its state machines, hpack's tables.

Also the inbound fast path's half: what a request's HEADERS frame does to
h2's connection (``inbound_ready``, ``receive_request_headers``), so that
most requests never pass through h2's frame objects and events.

Tested with h2 4.1 to 4.4.  h2 raises a body-length error from inside its
frame loop, where every ProtocolError ends the connection; RFC 9113 (8.1.1)
makes it a stream error, and the only place to catch it for one stream is
the DATA frame's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from h2.connection import ConnectionInputs, ConnectionState, H2Connection, _decode_headers
from h2.exceptions import InvalidBodyLengthError, ProtocolError
from h2.stream import H2Stream, StreamClosedBy, StreamInputs, StreamState
from h2.utilities import is_informational_response, normalize_inbound_headers

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


def inbound_ready(conn: H2Connection) -> bool:
    """Whether h2 serves requests and holds none of the client's bytes: no partial frame or open header block.

    Only then may a frame be handled without h2's receive_data and stay in
    order with what h2 has seen.
    """
    buf = conn.incoming_buffer
    return (
        conn.state_machine.state is ConnectionState.SERVER_OPEN
        and not buf._data
        and not buf._headers_buffer
        and not buf._preamble_len
    )


_OPEN = frozenset((StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE))


def _open_inbound_streams(conn: H2Connection) -> int:
    """h2's ``open_inbound_streams``: the client's open streams counted, closed ones moved out (on each new stream).

    The same walk without two property calls per stream, which made it a
    tenth of the fast path with ten streams per read.
    """
    count = 0
    closed = None
    for stream_id, stream in conn.streams.items():
        state = stream.state_machine.state
        if state in _OPEN:
            count += stream_id & 1
        elif state is StreamState.CLOSED:
            if closed is None:
                closed = [stream_id]
            else:
                closed.append(stream_id)
    if closed is not None:
        gone = conn._closed_streams
        for stream_id in closed:
            gone[stream_id] = conn.streams.pop(stream_id).state_machine.stream_closed_by
    return count


def receive_request_headers(conn: H2Connection, stream_id: int, block: bytes, end_stream: bool) -> list[Any] | None:
    """A new request's fields from a whole HEADERS frame (END_HEADERS, no padding or priority), as h2 takes it.

    h2's receive_data builds frame objects, walks two state machines and
    makes events for every request: half of an HTTP/2 request's cost.  This
    does what its ``_receive_headers_frame`` does to the connection for a
    new stream: decode (h2's own error mapping), the stream created with
    h2's windows and sizes, its state moved (OPEN, or HALF_CLOSED_REMOTE
    with END_STREAM), the Content-Length h2 checks DATA against, cookies
    joined; and returns the fields the RequestReceived event would carry.

    None, with nothing changed, where h2 must decide: the connection not
    open, a stream id not new or not the client's, the stream limit
    reached.  A ProtocolError (a bad block, a bad Content-Length, a
    request that looks like an informational answer) leaves the
    connection as h2's receive_data leaves it: GOAWAY queued, then raised.
    """
    if (
        conn.state_machine.state is not ConnectionState.SERVER_OPEN
        or not stream_id & 1
        or stream_id <= conn.highest_inbound_stream_id
        or _open_inbound_streams(conn) >= conn.local_settings.max_concurrent_streams
    ):
        return None
    try:
        headers = _decode_headers(conn.decoder, block)
        stream = H2Stream(
            stream_id,
            config=conn.config,
            inbound_window_size=conn.local_settings.initial_window_size,
            outbound_window_size=conn.remote_settings.initial_window_size,
        )
        stream.max_outbound_frame_size = conn.max_outbound_frame_size
        conn.streams[stream_id] = stream
        conn.highest_inbound_stream_id = stream_id
        cookie = status = False
        for field in headers:
            name = field[0]
            if name == b"cookie":
                cookie = True
            elif name == b":status":
                status = True
        if status and is_informational_response(headers):  # h2's receive_headers refuses it: a connection error
            stream.receive_headers(headers, end_stream, None)
        machine = stream.state_machine
        machine.client = False
        machine.headers_received = True
        machine.state = StreamState.HALF_CLOSED_REMOTE if end_stream else StreamState.OPEN
        stream._initialize_content_length(headers)
    except ProtocolError as e:
        conn._terminate_connection(e.error_code)
        raise
    if cookie and conn.config.normalize_inbound_headers:
        return list(normalize_inbound_headers(headers, None))  # type: ignore[arg-type]
    return headers if type(headers) is list else list(headers)


def receive_data_frame(conn: H2Connection, stream_id: int, length: int, end_stream: bool) -> bool:
    """Move h2's state for an unpadded DATA frame of ``length`` bytes as its receive_data would; False where h2 must.

    For a request stream h2 has open for reading (OPEN or HALF_CLOSED_LOCAL)
    on a serving connection, and a frame within both receive windows and
    the stream's Content-Length: both windows shrink, the body so far grows,
    and END_STREAM moves the state as h2's machine does.  Anything else
    (a closed or unknown stream, a window or Content-Length broken) changes
    nothing and is h2's to refuse.
    """
    stream = conn.streams.get(stream_id)
    if stream is None or conn.state_machine.state is not ConnectionState.SERVER_OPEN:
        return False
    machine = stream.state_machine
    state = machine.state
    if (state is not StreamState.OPEN and state is not StreamState.HALF_CLOSED_LOCAL) or not machine.headers_received:
        return False
    conn_window = conn._inbound_flow_control_window_manager
    stream_window = stream._inbound_window_manager
    actual = stream._actual_content_length + length
    expected = stream._expected_content_length
    if (
        length > conn_window.current_window_size
        or length > stream_window.current_window_size
        or (expected is not None and (expected < actual or (end_stream and expected != actual)))
    ):
        return False
    conn_window.current_window_size -= length
    stream_window.current_window_size -= length
    stream._actual_content_length = actual
    if end_stream:
        if state is StreamState.OPEN:
            machine.state = StreamState.HALF_CLOSED_REMOTE
        else:
            machine.state = StreamState.CLOSED
            machine.stream_closed_by = StreamClosedBy.RECV_END_STREAM
    return True


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
    machine = stream.state_machine
    if (
        machine.state is StreamState.HALF_CLOSED_REMOTE
        and machine.headers_sent is None
        and machine.client is False
        and conn.state_machine.state is ConnectionState.SERVER_OPEN
    ):
        # The common case, a whole request answered, without the machines'
        # lookups: what response_sent (and send_end_stream) do.
        machine.headers_sent = True
        if end_stream:
            machine.state = StreamState.CLOSED
            machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
    else:
        conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine.process_input(StreamInputs.SEND_HEADERS)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
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
    machine = stream.state_machine
    if machine.state is StreamState.HALF_CLOSED_REMOTE and conn.state_machine.state is ConnectionState.SERVER_OPEN:
        if end_stream:  # as send_end_stream does; SEND_DATA changes nothing here
            machine.state = StreamState.CLOSED
            machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
    else:
        conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine.process_input(StreamInputs.SEND_DATA)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
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
