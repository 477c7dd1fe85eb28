"""Raw-packet helpers for the capture-bypass tests: send hand-made TCP segments, or watch for them.

`raw_probe.py send IP PORT FLAGS MARKER` (in the pod, as root: needs NET_RAW) sends one TCP segment
with the given flags and MARKER as payload; `raw_probe.py watch SECONDS MARKER` (in the internet)
prints one JSON line saying whether any TCP segment carrying MARKER arrived meanwhile.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time

FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _source_address(destination: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((destination, 9))  # no packet: only picks the route's source address
        return str(probe.getsockname()[0])


def send(destination: str, port: int, flags: str, marker: bytes) -> dict[str, object]:
    source = _source_address(destination)
    sport = random.randint(20000, 60000)
    bits = sum(FLAGS[f] for f in flags)
    header = struct.pack("!HHIIBBHHH", sport, port, random.getrandbits(32), 0, 5 << 4, bits, 65535, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination)
    pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(marker))
    checksum = _checksum(pseudo + header + marker)
    header = header[:16] + struct.pack("!H", checksum) + header[18:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as sock:
        try:
            sock.sendto(header + marker, (destination, 0))
        except PermissionError:  # an OUTPUT DROP rule answers a local sender with EPERM
            return {"sent": False, "error": "EPERM"}
    return {"sent": True, "source": source}


def watch(seconds: float, marker: bytes) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as sock:
        print(json.dumps({"ready": True}), flush=True)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                packet = sock.recv(65536)
            except TimeoutError:
                break
            if marker in packet:
                return {"seen": True}
    return {"seen": False}


if __name__ == "__main__":
    if sys.argv[1] == "send":
        result = send(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].encode())
    else:
        result = watch(float(sys.argv[2]), sys.argv[3].encode())
    print(json.dumps(result), flush=True)
