#!/usr/bin/env python3
"""QUIC echo client on aioquic, a foreign peer for Quichex's interop tests.

Sends SIZE deterministic bytes + FIN on each of N bidi and M uni streams,
checks every echo (bidi: same stream; uni: one server uni stream each,
matched by content), optionally sends DATAGRAM frames in bursts and counts
their echoes, resets/stops extra streams or asks the server to, closes with
the given application code and reason (or waits for an idle timeout), and
prints one JSON line: {"ok", "alpn", "bidi", "uni", "bytes",
"key_phase", "mbps", "error"} plus a key per optional flag used. Exit status
0 when ok, else 1.

With --resume, a first connection only fetches a session ticket and all the
rest runs on a second one that resumes with it; --early-data sends that
connection's streams as 0-RTT data.
"""

import argparse
import asyncio
import json
import logging
import random
import ssl
import sys
import time
from collections import Counter

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import CipherSuite, Epoch, SessionTicket


CLOSE_GRACE = 0.25  # seconds to linger after sending CONNECTION_CLOSE
DGRAM_QUIET = 0.5  # --dgrams: stop waiting for echoes after this long without one
MAX_DATAGRAM_FRAME = 65536  # --dgrams: our max_datagram_frame_size transport parameter


class Failure(Exception):
    pass


class EchoClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connected = False
        self.alpn: str | None = None
        self.handshake: HandshakeCompleted | None = None
        self.received: dict[int, bytearray] = {}
        self.finished: set[int] = set()
        self.error: str | None = None
        self.changed = asyncio.Event()
        self.resets: dict[int, int] = {}  # stream -> RESET_STREAM code received
        self.stops: dict[int, int] = {}  # stream -> STOP_SENDING code received
        self.special: set[int] = set()  # streams a peer may reset: not errors
        self.terminated: ConnectionTerminated | None = None
        self.datagrams: list[bytes] = []  # DATAGRAM payloads received, in order

    def quic_event_received(self, event) -> None:
        if isinstance(event, HandshakeCompleted):
            self.connected, self.alpn, self.handshake = True, event.alpn_protocol, event
        elif isinstance(event, StreamDataReceived):
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.finished.add(event.stream_id)
        elif isinstance(event, DatagramFrameReceived):
            self.datagrams.append(event.data)
        elif isinstance(event, StreamReset):
            self.resets[event.stream_id] = event.error_code
            if event.stream_id not in self.special:
                self.error = f"stream {event.stream_id} reset by peer, code {event.error_code}"
        elif isinstance(event, StopSendingReceived):
            self.stops[event.stream_id] = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            self.error = self.error or describe_close(event)
        self.changed.set()

    async def wait_for(self, condition) -> None:
        while not condition():
            if self.error:
                raise Failure(self.error)
            self.changed.clear()
            await self.changed.wait()

    async def wait_closed(self) -> None:
        # connect() awaits this on exit. aioquic lingers 3 PTOs after sending
        # CONNECTION_CLOSE, which could outlast --timeout: cap it.
        try:
            await asyncio.wait_for(super().wait_closed(), CLOSE_GRACE)
        except TimeoutError:
            pass


def describe_close(event: ConnectionTerminated) -> str:
    # aioquic reports its own idle timeout with this reason and frame type 0.
    if event.reason_phrase == "Idle timeout" and event.frame_type == 0:
        return "idle timeout"
    return f"connection closed, code {event.error_code}, reason {event.reason_phrase!r}"


def payload(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


def dgram_payload(index: int, size: int) -> bytes:
    """--dgrams: the index (4 bytes, big-endian), then bytes seeded 2_000_000 + index."""
    return index.to_bytes(4, "big") + payload(2_000_000 + index, size - 4)


def configuration(args: argparse.Namespace) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=[args.alpn])
    config.server_name = args.server_name
    if args.insecure:
        config.verify_mode = ssl.CERT_NONE
    elif args.cafile:
        ssl.create_default_context(cafile=args.cafile)  # fail early on a bad file
        config.load_verify_locations(cafile=args.cafile)
    if args.chacha20:
        config.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]
    if args.version is not None:
        # The first Initial carries this version (aioquic needs it in
        # supported_versions; an unknown one gets v1's Initial salt). After a
        # Version Negotiation packet aioquic starts over with the first of
        # its supported_versions that the server lists.
        config.original_version = args.version
        others = [v for v in config.supported_versions if v != args.version]
        config.supported_versions = [args.version, *others]
    if args.dgrams:
        config.max_datagram_frame_size = MAX_DATAGRAM_FRAME
    return config


async def first_connection(args: argparse.Namespace) -> SessionTicket:
    """--resume: a first connection, only for a session ticket. It is closed
    (code 0, reason "resume") as soon as one arrived."""
    tickets: list[SessionTicket] = []
    arrived = asyncio.Event()

    def keep(ticket: SessionTicket) -> None:
        tickets.append(ticket)
        arrived.set()

    async with connect(
        args.host,
        args.port,
        configuration=configuration(args),
        create_protocol=EchoClientProtocol,
        session_ticket_handler=keep,
        wait_connected=False,
    ) as conn:
        conn.transmit()
        try:
            await conn.wait_for(lambda: conn.connected)
        except Failure as e:
            raise Failure(f"first connection: handshake failed: {e}")
        await arrived.wait()
        conn.close(error_code=0, reason_phrase="resume")
    return tickets[-1]


async def run(args: argparse.Namespace, result: dict) -> None:
    # Leave time for the close: connect() lingers up to CLOSE_GRACE on exit.
    deadline = asyncio.get_running_loop().time() + max(0.0, args.timeout - CLOSE_GRACE)
    config = configuration(args)
    if args.resume:
        try:
            async with asyncio.timeout_at(deadline):
                config.session_ticket = await first_connection(args)
        except TimeoutError:
            raise Failure(
                f"timeout after {args.timeout}s: no session ticket from the first connection"
            )

    # wait_connected=False: we wait for the handshake ourselves, to report why it failed.
    async with connect(
        args.host,
        args.port,
        configuration=config,
        create_protocol=EchoClientProtocol,
        wait_connected=False,
    ) as conn:
        conn.transmit()
        try:
            async with asyncio.timeout_at(deadline):
                # --early-data: the streams go out before the handshake
                # completes, in 0-RTT packets (if the ticket allows it).
                if not args.early_data:
                    await handshake(conn)
                await exchange(args, conn, result)
                await handshake(conn)
                await datagrams(args, conn, result)
                await specials(args, conn, result)
                if args.version is not None:
                    result["version"] = conn._quic._version
                    result["vn"] = conn._quic._version_negotiated_incompatible
                if args.resume:
                    result["resumed"] = conn.handshake.session_resumed
                if args.early_data:
                    offered = config.session_ticket.max_early_data_size is not None
                    accepted = conn.handshake.early_data_accepted
                    result["early_data"] = (
                        "accepted" if accepted else "rejected" if offered else "none"
                    )
                if args.wait_idle is not None:
                    await wait_idle(args, conn, result)
                    return
        except TimeoutError:
            state = "done" if conn.connected else "not done"
            raise Failure(
                f"timeout after {args.timeout}s: handshake {state}, "
                f"{len(conn.finished)} of {args.streams + args.uni} echoes complete"
            )
        conn.close(error_code=args.close_code, reason_phrase=args.close_reason)


async def handshake(conn: EchoClientProtocol) -> None:
    try:
        await conn.wait_for(lambda: conn.connected)
    except Failure as e:
        raise Failure(f"handshake failed: {e}")


async def exchange(args: argparse.Namespace, conn: EchoClientProtocol, result: dict) -> None:
    quic = conn._quic
    result["alpn"] = conn.alpn  # None for now with --early-data: set again below
    started = time.monotonic()
    # Open every stream first, so ids are allocated in order: bidi payloads are
    # seeded 0.., uni payloads 1_000_000..
    streams: list[tuple[int, bytes]] = []
    for i in range(args.streams + args.uni):
        uni = i >= args.streams
        sid = quic.get_next_available_stream_id(is_unidirectional=uni)
        quic.send_stream_data(sid, b"")  # creates the stream, sends nothing yet
        streams.append((sid, payload(1_000_000 + i if uni else i, args.size)))
    half = args.size // 2
    for sid, data in streams:
        quic.send_stream_data(sid, data[:half])
    conn.transmit()
    if args.key_update:
        try:
            await conn.ping()  # one round trip: the handshake is confirmed by now
        except ConnectionError:
            raise Failure(conn.error or "connection closed")
        conn.request_key_update()
    for sid, data in streams:
        quic.send_stream_data(sid, data[half:], end_stream=True)
    conn.transmit()

    bidi = {sid: data for sid, data in streams if sid & 2 == 0}
    sent_uni = Counter(data for sid, data in streams if sid & 2)

    def echoed_uni() -> set[int]:  # finished server-initiated uni streams
        return {sid for sid in conn.finished if sid & 3 == 3}

    await conn.wait_for(lambda: bidi.keys() <= conn.finished and len(echoed_uni()) >= args.uni)
    for sid, data in bidi.items():
        got = conn.received[sid]
        if got != data:
            diff = next((i for i, (a, b) in enumerate(zip(got, data)) if a != b), None)
            at = min(len(got), len(data)) if diff is None else diff
            raise Failure(f"bidi stream {sid}: echoed {len(got)} of {len(data)} bytes, "
                          f"differs at byte {at}")
    got_uni = Counter(bytes(conn.received[sid]) for sid in echoed_uni())
    if got_uni != sent_uni:
        lengths = sorted(len(data) for data in got_uni.elements())
        raise Failure(f"uni echoes do not match what was sent: got lengths {lengths}")
    result["alpn"] = conn.alpn
    result.update(bidi=len(bidi), uni=args.uni, bytes=args.size * len(streams))
    result["key_phase"] = quic._cryptos[Epoch.ONE_RTT].send.key_phase
    result["mbps"] = round(result["bytes"] / max(time.monotonic() - started, 1e-9) / 1e6, 2)


async def datagrams(args: argparse.Namespace, conn: EchoClientProtocol, result: dict) -> None:
    """--dgrams N: send N DATAGRAM frames of --dgram-size bytes, --dgram-burst
    at a time; after each burst, wait until every datagram sent so far is
    back or none came for DGRAM_QUIET seconds."""
    if not args.dgrams:
        return
    quic = conn._quic
    peer_max = quic._remote_max_datagram_frame_size
    if peer_max is None:
        raise Failure("the server does not accept DATAGRAM frames")
    # The frame (type, a length of up to 4 bytes, payload) must stay below the peer's limit.
    if 1 + 4 + args.dgram_size >= peer_max:
        raise Failure(
            f"--dgram-size {args.dgram_size}: the server takes frames below {peer_max} bytes"
        )
    sent = [dgram_payload(i, args.dgram_size) for i in range(args.dgrams)]
    burst = args.dgram_burst or len(sent)
    echoed: set[int] = set()
    dup = bad = 0
    checked = 0  # conn.datagrams[:checked] are counted

    def count() -> None:
        nonlocal checked, dup, bad
        for data in conn.datagrams[checked:]:
            index = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
            if 0 <= index < len(sent) and data == sent[index]:
                if index in echoed:
                    dup += 1
                echoed.add(index)
            else:
                bad += 1
        checked = len(conn.datagrams)

    for start in range(0, len(sent), burst):
        for data in sent[start:start + burst]:
            quic.send_datagram_frame(data)
        conn.transmit()
        target = min(start + burst, len(sent))
        while True:
            count()
            if len(echoed) >= target or conn.error:
                break
            conn.changed.clear()
            try:
                await asyncio.wait_for(conn.changed.wait(), DGRAM_QUIET)
            except TimeoutError:
                break
        if conn.error:
            break
    result.update(dgrams_sent=len(sent), dgrams_echoed=len(echoed), dgrams_dup=dup,
                  dgrams_bad=bad)
    if conn.error:
        raise Failure(conn.error)
    if dup or bad:
        raise Failure(f"datagram echoes: {dup} duplicated, {bad} not sent by us")
    if not echoed:
        raise Failure(f"none of the {len(sent)} datagrams came back")


async def specials(args: argparse.Namespace, conn: EchoClientProtocol, result: dict) -> None:
    """--reset-code, --stop-code, --ask-reset, --ask-stop: one new bidi stream
    each, in that order, after the echoes."""
    quic = conn._quic

    def open_with(data: bytes) -> int:
        sid = quic.get_next_available_stream_id()
        conn.special.add(sid)
        quic.send_stream_data(sid, data)
        return sid

    if args.reset_code is not None:
        # Reset our side; wait until the peer ends its side (FIN or RESET_STREAM).
        sid = open_with(b"x")
        quic.reset_stream(sid, args.reset_code)
        conn.transmit()
        await conn.wait_for(lambda: sid in conn.finished or sid in conn.resets)
        result["reset_sent"] = args.reset_code
    if args.stop_code is not None:
        # STOP_SENDING; the peer must answer with RESET_STREAM (RFC 9000 3.5).
        sid = open_with(b"x")
        quic.stop_stream(sid, args.stop_code)
        conn.transmit()
        await conn.wait_for(lambda: sid in conn.resets)
        result["stop_sent"] = args.stop_code
    if args.ask_reset is not None:
        sid = open_with(f"RESET {args.ask_reset}\n".encode())
        conn.transmit()
        await conn.wait_for(lambda: sid in conn.resets or sid in conn.finished)
        if sid not in conn.resets:
            raise Failure(f"stream {sid}: the peer finished it instead of resetting it")
        result["peer_reset"] = conn.resets[sid]
    if args.ask_stop is not None:
        sid = open_with(f"STOP {args.ask_stop}\n".encode())
        conn.transmit()
        await conn.wait_for(lambda: sid in conn.stops)
        result["peer_stop"] = conn.stops[sid]


async def wait_idle(args: argparse.Namespace, conn: EchoClientProtocol, result: dict) -> None:
    """--wait-idle S: send nothing more, wait up to S s for the connection to end."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(args.wait_idle):
            while conn.terminated is None:
                conn.changed.clear()
                await conn.changed.wait()
    except TimeoutError:
        raise Failure(f"the connection was still open after --wait-idle {args.wait_idle}s")
    result["ended"] = describe_close(conn.terminated)
    result["ended_after_ms"] = round((time.monotonic() - started) * 1000)


async def main(args: argparse.Namespace) -> int:
    result = {"ok": False, "alpn": None, "bidi": 0, "uni": 0, "bytes": 0, "key_phase": 0}
    result["mbps"] = 0
    result["error"] = None
    try:
        # Backstop only: run() times out first, with a better message.
        async with asyncio.timeout(args.timeout + CLOSE_GRACE):
            await run(args, result)
        result["ok"] = True
    except TimeoutError:
        result["error"] = f"timeout after {args.timeout}s"
    except Failure as e:
        result["error"] = str(e)
    except Exception as e:  # e.g. a bad --cafile
        result["error"] = f"{type(e).__name__}: {e}"
    if not result["ok"]:
        result["mbps"] = 0
    # Keep "error" last, as before the optional keys were added.
    result["error"] = result.pop("error")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    logging.getLogger("quic").setLevel(logging.CRITICAL)  # aioquic logs closes as errors
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alpn", default="quichex-echo")
    verify = parser.add_mutually_exclusive_group()
    verify.add_argument("--cafile", help="CA bundle to verify the server with")
    verify.add_argument("--insecure", action="store_true", help="do not verify the server")
    parser.add_argument("--server-name", help="SNI and name to verify (default: --host)")
    parser.add_argument("--streams", type=int, default=1, help="bidi streams")
    parser.add_argument("--uni", type=int, default=0, help="uni streams")
    parser.add_argument("--size", type=int, default=1000, help="bytes per stream")
    parser.add_argument("--close-code", type=int, default=0)
    parser.add_argument("--close-reason", default="done")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--key-update", action="store_true", help="update 1-RTT keys midway")
    parser.add_argument("--chacha20", action="store_true", help="offer only ChaCha20-Poly1305")
    parser.add_argument("--reset-code", type=int, help="reset an extra stream with this code")
    parser.add_argument("--stop-code", type=int, help="STOP_SENDING an extra stream with this code")
    parser.add_argument("--ask-reset", type=int, help="ask the server to reset a stream (RESET N)")
    parser.add_argument("--ask-stop", type=int, help="ask the server to STOP_SENDING (STOP N)")
    parser.add_argument("--wait-idle", type=float, help="do not close: wait S s for an idle timeout")
    parser.add_argument("--version", type=lambda v: int(v, 0), help="first QUIC version offered")
    parser.add_argument("--dgrams", type=int, default=0, help="DATAGRAM frames to send")
    parser.add_argument("--dgram-size", type=int, default=1000, help="bytes per DATAGRAM (>= 4)")
    parser.add_argument("--dgram-burst", type=int, default=20,
                        help="DATAGRAMs sent before waiting for their echoes (0: all)")
    parser.add_argument("--resume", action="store_true",
                        help="connect once for a session ticket, then again resuming with it")
    parser.add_argument("--early-data", action="store_true",
                        help="with --resume: send the streams as 0-RTT data")
    args = parser.parse_args()
    if args.early_data and not args.resume:
        parser.error("--early-data needs --resume")
    if args.dgrams and args.dgram_size < 4:
        parser.error("--dgram-size must be at least 4 (the index)")
    sys.exit(asyncio.run(main(args)))
