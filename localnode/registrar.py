"""The CSI node-driver-registrar's job, for the one-node cluster when its binary cannot be built.

The registrar (github.com/kubernetes-csi/node-driver-registrar) is not on the Go module proxy, so
`scripts/build-node.sh` builds it only from a git checkout of its source. Without one, the node runs
this instead: it serves the kubelet's plugin-registration protocol (`pluginregistration.Registration`,
k8s.io/kubelet/pkg/apis/pluginregistration/v1, gRPC over the unix socket the kubelet's plugin watcher
finds in `plugins_registry/`), tells the kubelet the CSI driver's name, endpoint and supported CSI
versions, and exits non-zero when the kubelet reports that the registration failed, as the real
registrar does. The kubelet then talks to the SPIFFE CSI driver itself (NodeGetInfo, and the volume
calls), and lists the driver in the node's CSINode object, exactly as with the real registrar.

    python localnode/registrar.py --csi-address SOCK --kubelet-registration-path SOCK \\
        --plugin-registration-path DIR --driver-name csi.spiffe.io
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE = "/pluginregistration.Registration/"
CSI_VERSIONS = ("1.0.0",)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string_field(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def plugin_info(name: str, endpoint: str, versions: tuple[str, ...] = CSI_VERSIONS) -> bytes:
    """`PluginInfo{type: "CSIPlugin", name, endpoint, supported_versions}`, protobuf-encoded."""
    return (
        _string_field(1, "CSIPlugin")
        + _string_field(2, name)
        + _string_field(3, endpoint)
        + b"".join(_string_field(4, v) for v in versions)
    )


def registration_status(data: bytes) -> tuple[bool, str]:
    """(plugin_registered, error) from an encoded `RegistrationStatus`; unknown fields are skipped."""
    registered, error, i = False, "", 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
            if number == 1:
                registered = bool(value)
        elif wire == 2:
            length = varint()
            chunk, i = data[i : i + length], i + length
            if number == 2:
                error = chunk.decode(errors="replace")
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"RegistrationStatus: wire type {wire} is not protobuf")
    return registered, error


class Registration(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no types
    def __init__(self, info: bytes, done: Callable[[bool, str], None]) -> None:
        self._info = info
        self._done = done

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if method == SERVICE + "GetInfo":
            return grpc.unary_unary_rpc_method_handler(self._get_info)
        if method == SERVICE + "NotifyRegistrationStatus":
            return grpc.unary_unary_rpc_method_handler(self._notify)
        return None

    def _get_info(self, request: bytes, context: Any) -> bytes:
        print("kubelet asked for the plugin's info (GetInfo)", flush=True)
        return self._info

    def _notify(self, request: bytes, context: Any) -> bytes:
        registered, error = registration_status(request)
        self._done(registered, error)
        return b""  # RegistrationStatusResponse{}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csi-address", required=True, help="the CSI driver's socket (must exist)")
    parser.add_argument(
        "--kubelet-registration-path", required=True, help="that socket as the kubelet sees it"
    )
    parser.add_argument("--plugin-registration-path", required=True, help="the kubelet's plugins_registry")
    parser.add_argument("--driver-name", required=True)
    args = parser.parse_args(argv)
    if not Path(args.csi_address).is_socket():
        print(f"the CSI driver's socket {args.csi_address} does not exist (is it running?)", flush=True)
        return 1
    registry = Path(args.plugin_registration_path)
    registry.mkdir(parents=True, exist_ok=True)
    socket_path = registry / f"{args.driver_name}-reg.sock"
    socket_path.unlink(missing_ok=True)
    outcome: list[int] = []
    stopped = threading.Event()

    def done(registered: bool, error: str) -> None:
        if registered:
            print(f"kubelet registered {args.driver_name}", flush=True)
        else:
            print(f"kubelet refused {args.driver_name}: {error}", flush=True)
            outcome.append(1)
            stopped.set()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (Registration(plugin_info(args.driver_name, args.kubelet_registration_path), done),)
    )
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    print(f"serving the plugin registration of {args.driver_name} on {socket_path}", flush=True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
    socket_path.unlink(missing_ok=True)  # the kubelet deregisters a plugin whose socket is gone
    return outcome[0] if outcome else 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
