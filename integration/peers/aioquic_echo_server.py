#!/usr/bin/env python3
"""QUIC echo server on aioquic, a foreign peer for Quichex's interop tests.

Bidi streams are echoed byte for byte (FIN answered with FIN), unless their
first bytes are a command: `RESET <code>\n` resets the stream (RESET_STREAM)
with that code, `STOP <code>\n` asks the client to stop sending
(STOP_SENDING). A client uni stream is buffered until its FIN, then sent back
on a new server uni stream.

stdout (one line each, flushed): `LISTENING <port>` once bound,
`CONNECTED <alpn>` per completed handshake, followed by `RESUMED` when it
resumed a session (the server issues session tickets), `EARLY_DATA
accepted` when it accepted 0-RTT and `EARLY_STREAM <id> <n>` for each bidi
stream that carried n bytes of 0-RTT data, `CLOSED <code> <reason>` per
connection the peer closed, `STREAM_RESET <id> <code>` / `STOP_SENDING <id>
<code>` when the client resets a stream / stops one of ours, `DATAGRAMS <n>`
when a connection that carried DATAGRAM frames ends. Every DATAGRAM frame is
echoed as a DATAGRAM frame. Exits when killed or when stdin reaches EOF.
"""

import argparse
import asyncio
import logging
import os
import stat
import sys

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import CipherSuite, SessionTicket


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


COMMANDS = (b"RESET ", b"STOP ")
MAX_COMMAND = 32  # a command line is at most this long
MAX_DATAGRAM_FRAME = 65536  # our max_datagram_frame_size transport parameter


def parse_command(head: bytes):
    """Classify the first bytes of a bidi stream: ("echo", None) for plain data,
    ("wait", None) while they may still become a command, or (word, code)."""
    if not any(head.startswith(w) or w.startswith(head) for w in COMMANDS):
        return "echo", None
    line, newline, _ = head.partition(b"\n")
    if not newline:
        return ("wait", None) if len(head) < MAX_COMMAND else ("echo", None)
    word, _, code = line.partition(b" ")
    if code.isdigit():
        return word.decode(), int(code)
    return "echo", None


class EchoServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._uni: dict[int, bytearray] = {}  # client uni stream -> bytes so far
        # bidi stream -> first bytes not yet classified (None once it is).
        self._head: dict[int, bytearray | None] = {}
        self._commanded: set[int] = set()  # bidi streams that carried a command
        self._datagrams = 0  # DATAGRAM frames received (and echoed)
        self._handshake_done = False
        self._early: dict[int, int] = {}  # bidi stream -> bytes before the handshake completed

    def quic_event_received(self, event) -> None:
        if isinstance(event, HandshakeCompleted):
            say(f"CONNECTED {event.alpn_protocol}")
            if event.session_resumed:
                say("RESUMED")
            if event.early_data_accepted:
                say("EARLY_DATA accepted")
            # Data that came before the handshake completed was 0-RTT data.
            for sid, n in self._early.items():
                say(f"EARLY_STREAM {sid} {n}")
            self._handshake_done = True
        elif isinstance(event, StreamDataReceived):
            sid = event.stream_id
            if sid & 2 == 0:  # bidirectional: echo on the same stream
                if not self._handshake_done and event.data:
                    self._early[sid] = self._early.get(sid, 0) + len(event.data)
                self._bidi(sid, event.data, event.end_stream)
            else:  # unidirectional: answer on a new stream after FIN
                buf = self._uni.setdefault(sid, bytearray())
                buf += event.data
                if event.end_stream:
                    del self._uni[sid]
                    out = self._quic.get_next_available_stream_id(is_unidirectional=True)
                    self._quic.send_stream_data(out, bytes(buf), end_stream=True)
        elif isinstance(event, DatagramFrameReceived):
            self._datagrams += 1
            self._quic.send_datagram_frame(event.data)
        elif isinstance(event, StreamReset):
            self._uni.pop(event.stream_id, None)
            say(f"STREAM_RESET {event.stream_id} {event.error_code}")
        elif isinstance(event, StopSendingReceived):
            say(f"STOP_SENDING {event.stream_id} {event.error_code}")
        elif isinstance(event, ConnectionTerminated):
            if self._datagrams:
                say(f"DATAGRAMS {self._datagrams}")
            # aioquic reports its own idle timeout with this exact reason.
            if event.reason_phrase != "Idle timeout" or event.frame_type != 0:
                reason = event.reason_phrase.replace("\n", " ")
                say(f"CLOSED {event.error_code} {reason}")

    def _bidi(self, sid: int, data: bytes, fin: bool) -> None:
        """Echo, or run the command the stream starts with (and echo nothing)."""
        head = self._head.setdefault(sid, bytearray())
        if head is None:  # plain echo stream, or a command already done
            if sid not in self._commanded:
                self._quic.send_stream_data(sid, data, fin)
            return
        head += data
        kind, code = parse_command(bytes(head))
        if kind == "wait" and not fin:
            return
        self._head[sid] = None
        if kind == "RESET":
            self._commanded.add(sid)
            self._quic.reset_stream(sid, code)
        elif kind == "STOP":
            self._commanded.add(sid)
            self._quic.stop_stream(sid, code)
        else:
            self._quic.send_stream_data(sid, bytes(head), fin)


class TicketStore:
    """Session tickets issued by this server, each usable once (a ticket
    taken for a resumption is gone, so its 0-RTT data cannot be replayed)."""

    def __init__(self) -> None:
        self._tickets: dict[bytes, SessionTicket] = {}

    def add(self, ticket: SessionTicket) -> None:
        self._tickets[ticket.ticket] = ticket

    def pop(self, label: bytes) -> SessionTicket | None:
        return self._tickets.pop(label, None)


async def stdin_eof() -> None:
    """Return when stdin reaches EOF. A stdin that cannot be polled
    (/dev/null, a regular file) is not watched: serve until killed."""
    mode = os.fstat(0).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0)):
        await asyncio.Event().wait()
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(65536):
        pass


async def main(args: argparse.Namespace) -> None:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=args.alpn or ["quichex-echo"],
        idle_timeout=args.idle_timeout,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME,
    )
    config.load_cert_chain(args.cert, args.key)
    if args.chacha20:
        config.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]
    # With a ticket store, aioquic resumes sessions and accepts 0-RTT data
    # from any client that offers it with one of our tickets.
    tickets = TicketStore()
    server = await serve(
        args.host,
        args.port,
        configuration=config,
        create_protocol=EchoServerProtocol,
        retry=args.retry,
        session_ticket_fetcher=tickets.pop,
        session_ticket_handler=tickets.add,
    )
    say(f"LISTENING {server._transport.get_extra_info('sockname')[1]}")
    try:
        await stdin_eof()
    finally:
        server.close()


if __name__ == "__main__":
    logging.getLogger("quic").setLevel(logging.CRITICAL)  # aioquic logs closes as errors
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--alpn", action="append", help="repeatable (default quichex-echo)")
    parser.add_argument("--retry", action="store_true", help="validate addresses with Retry")
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument("--chacha20", action="store_true", help="accept only ChaCha20-Poly1305")
    try:
        asyncio.run(main(parser.parse_args()))
    except KeyboardInterrupt:
        pass
