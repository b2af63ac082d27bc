#!/usr/bin/env python3
"""An interpreted stand-in for a real edge service: the example workload's protocol (TCP only)
served by CPython's asyncio, with a self-verifying memory state and a session table of Python
objects that every request reads, so that answering touches interpreter memory spread over many
pages (what a lazily restored Python or Node service faults in after a move).

Protocol (big-endian, see src/workload/proto.rs):
  request  magic u32 0x54515251 | seq u64 | kind u8 | len u32 | payload
  reply    magic u32 0x54515250 | seq u64 | received u64 | kind u8 | status u8 | digest u64
           | len u32 | payload
Echo (kind 0) answers the payload XOR 0x5A; VerifyState (kind 1) checks every page of the state
and answers status 0 with a digest, or 1 with what is wrong. A sequence number out of order gets
status 2 and the connection is closed, as the Rust service does.

Usage: interpreted_service.py --listen IP:PORT [--state-mb N] [--dirty-pages-per-sec N]
       [--sessions N]
"""

import argparse
import asyncio
import hashlib
import os
import random
import struct
import sys

REQUEST_MAGIC = 0x54515251
REPLY_MAGIC = 0x54515250
REQ_HEADER = struct.Struct(">IQBI")
REPLY_HEADER = struct.Struct(">IQQBBQI")
MAX_PAYLOAD = 64 * 1024
ECHO_XOR = 0x5A
PAGE = 4096
XOR_TABLE = bytes(b ^ ECHO_XOR for b in range(256))


class State:
    """Pages whose content follows from (index, version): page i holds its version in its first
    8 bytes and the byte (i * 31 + version) & 0xFF everywhere else."""

    def __init__(self, pages):
        self.pages = pages
        self.mem = bytearray(pages * PAGE)
        for i in range(pages):
            self._write(i, 0)

    def _write(self, i, version):
        off = i * PAGE
        fill = (i * 31 + version) & 0xFF
        self.mem[off : off + PAGE] = struct.pack(">Q", version) + bytes([fill]) * (PAGE - 8)

    def touch(self, i):
        off = i * PAGE
        (version,) = struct.unpack_from(">Q", self.mem, off)
        self._write(i, version + 1)

    def verify(self):
        for i in range(self.pages):
            off = i * PAGE
            (version,) = struct.unpack_from(">Q", self.mem, off)
            fill = (i * 31 + version) & 0xFF
            page = self.mem[off + 8 : off + PAGE]
            if page.count(fill) != PAGE - 8:
                return None, f"page {i} (version {version}) is damaged"
        return int.from_bytes(hashlib.blake2b(self.mem, digest_size=8).digest(), "big"), None


async def dirtier(state, rate):
    credit = 0.0
    loop = asyncio.get_running_loop()
    last = loop.time()
    while rate > 0:
        await asyncio.sleep(0.01)
        now = loop.time()
        credit += rate * min(now - last, 0.1)
        last = now
        n = int(credit)
        credit -= n
        for _ in range(n):
            state.touch(random.randrange(state.pages))


def reply(seq, received, kind, status, digest, payload):
    return REPLY_HEADER.pack(REPLY_MAGIC, seq, received, kind, status, digest, len(payload)) + payload


async def serve(reader, writer, state, sessions):
    expected = 0
    received = 0
    try:
        while True:
            head = await reader.readexactly(REQ_HEADER.size)
            magic, seq, kind, length = REQ_HEADER.unpack(head)
            if magic != REQUEST_MAGIC or kind > 1 or length > MAX_PAYLOAD:
                return
            payload = await reader.readexactly(length)
            if seq != expected:
                msg = f"expected sequence {expected}, got {seq}".encode()
                writer.write(reply(seq, received, kind, 2, 0, msg))
                await writer.drain()
                return
            expected += 1
            received += length
            # A session lookup, as a real service does per request: interpreter objects spread
            # over the heap.
            key = random.randrange(len(sessions))
            s = sessions[key]
            s["hits"] += 1
            s["last"] = seq
            if kind == 0:
                out = reply(seq, received, 0, 0, 0, payload.translate(XOR_TABLE))
            else:
                digest, damage = state.verify()
                if damage is None:
                    out = reply(seq, received, 1, 0, digest, b"")
                else:
                    out = reply(seq, received, 1, 1, 0, damage.encode())
            writer.write(out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--state-mb", type=int, default=16)
    p.add_argument("--dirty-pages-per-sec", type=float, default=100)
    p.add_argument("--sessions", type=int, default=100_000)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    state = State(a.state_mb * 256)
    sessions = [
        {"id": i, "user": f"user-{i}", "hits": 0, "last": -1, "tags": [i, i * 2]}
        for i in range(a.sessions)
    ]
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, state, sessions), host.strip("[]"), int(port)
    )
    print(
        f"interpreted service (pid {os.getpid()}) listening on {a.listen}: state {a.state_mb} MiB, "
        f"{a.sessions} sessions",
        flush=True,
    )
    asyncio.get_running_loop().create_task(dirtier(state, a.dirty_pages_per_sec))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
