"""Runs *inside* the client pod (stdlib only): alice's initialize calls to an MCP URL for N seconds.

`python - IDP_URL MCP_URL RESOURCE SECONDS` prints {"ok": n, "bad": n, "errors": [...]}: each call is
a new connection through the Service, so a restart that takes the service away shows up here.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "e2e", "version": "1"},
    },
}


def main() -> None:
    idp, url, resource, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "alice-password",
        "client_id": "e2e-cli",
        "resource": resource,
    }
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(idp + "/token", data=data, timeout=10) as response:  # noqa: S310
        token = json.load(response)["access_token"]
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {token}",
    }
    ok = bad = 0
    errors: list[str] = []
    end = time.time() + seconds
    while time.time() < end:
        request = urllib.request.Request(url, data=json.dumps(INIT).encode(), method="POST", headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                response.read()
            ok += 1
        except Exception as exc:  # every failure is data for the test
            bad += 1
            errors.append(f"{time.time():.1f} {type(exc).__name__}: {exc}"[:160])
        time.sleep(0.2)
    print(json.dumps({"ok": ok, "bad": bad, "errors": errors[:20]}))


if __name__ == "__main__":
    main()
