"""Tries to reach the network; reports what happened for each attempt (JSON)."""

import json
import socket
from typing import Any


def _attempt(family: int, address: Any) -> str:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return f"socket: {exc.errno}"
    try:
        sock.settimeout(2)
        sock.connect(address)
    except OSError as exc:
        return f"connect: {exc.errno}"
    finally:
        sock.close()
    return "connected"


def cape_handler(data: bytes) -> bytes:
    port = json.loads(data)["port"]
    result: dict[str, Any] = {
        "inet_local": _attempt(socket.AF_INET, ("127.0.0.1", port)),
        "inet_remote": _attempt(socket.AF_INET, ("1.1.1.1", 443)),
        "inet6": _attempt(socket.AF_INET6, ("::1", port)),
    }
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
        result["netlink"] = "opened"
    except OSError as exc:
        result["netlink"] = f"socket: {exc.errno}"
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        result["packet"] = "opened"
    except OSError as exc:
        result["packet"] = f"socket: {exc.errno}"
    left, right = socket.socketpair()
    left.sendall(b"unix ok")
    result["unix"] = right.recv(16).decode()
    with open("/proc/net/dev") as dev:
        result["interfaces"] = [line.split(":")[0].strip() for line in dev.readlines()[2:]]
    return json.dumps(result).encode()
