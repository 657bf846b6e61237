#!/usr/bin/env python3
"""QUIC echo client on aioquic, a foreign peer for Quichex's interop tests.

Sends SIZE deterministic bytes + FIN on each of N bidi and M uni streams,
checks every echo (bidi: same stream; uni: one server uni stream each,
matched by content), closes with the given application code and reason, and
prints one JSON line: {"ok", "alpn", "bidi", "uni", "bytes", "key_phase",
"error"}. Exit status 0 when ok, else 1.
"""

import argparse
import asyncio
import json
import logging
import random
import ssl
import sys
from collections import Counter

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import CipherSuite, Epoch


CLOSE_GRACE = 0.25  # seconds to linger after sending CONNECTION_CLOSE


class Failure(Exception):
    pass


class EchoClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connected = False
        self.alpn: str | None = None
        self.received: dict[int, bytearray] = {}
        self.finished: set[int] = set()
        self.error: str | None = None
        self.changed = asyncio.Event()

    def quic_event_received(self, event) -> None:
        if isinstance(event, HandshakeCompleted):
            self.connected, self.alpn = True, event.alpn_protocol
        elif isinstance(event, StreamDataReceived):
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.finished.add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.error = f"stream {event.stream_id} reset by peer, code {event.error_code}"
        elif isinstance(event, ConnectionTerminated):
            self.error = self.error or (
                f"connection closed, code {event.error_code}, reason {event.reason_phrase!r}"
            )
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


def payload(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


async def run(args: argparse.Namespace, result: dict) -> None:
    config = QuicConfiguration(is_client=True, alpn_protocols=[args.alpn])
    config.server_name = args.server_name
    if args.insecure:
        config.verify_mode = ssl.CERT_NONE
    elif args.cafile:
        ssl.create_default_context(cafile=args.cafile)  # fail early on a bad file
        config.load_verify_locations(cafile=args.cafile)
    if args.chacha20:
        config.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]

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
            # Leave time for the close: connect() lingers up to CLOSE_GRACE on exit.
            async with asyncio.timeout(max(0.0, args.timeout - CLOSE_GRACE)):
                try:
                    await conn.wait_for(lambda: conn.connected)
                except Failure as e:
                    raise Failure(f"handshake failed: {e}")
                await exchange(args, conn, result)
        except TimeoutError:
            handshake = "done" if conn.connected else "not done"
            raise Failure(
                f"timeout after {args.timeout}s: handshake {handshake}, "
                f"{len(conn.finished)} of {args.streams + args.uni} echoes complete"
            )
        conn.close(error_code=args.close_code, reason_phrase=args.close_reason)


async def exchange(args: argparse.Namespace, conn: EchoClientProtocol, result: dict) -> None:
    quic = conn._quic
    result["alpn"] = conn.alpn
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
    result.update(bidi=len(bidi), uni=args.uni, bytes=args.size * len(streams))
    result["key_phase"] = quic._cryptos[Epoch.ONE_RTT].send.key_phase


async def main(args: argparse.Namespace) -> int:
    result = {"ok": False, "alpn": None, "bidi": 0, "uni": 0, "bytes": 0, "key_phase": 0}
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
    sys.exit(asyncio.run(main(parser.parse_args())))
