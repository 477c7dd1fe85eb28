"""Whether another UID can run a Python interpreter and read the files it is handed.

The demo and the tests run the app as UID 1000 and the sidecar as UID 15337. An interpreter that lives
under a private home (pyenv under /root, mode 700) fails for them deep inside a child process, or worse
starts with another installation's standard library; this check says so up front, in one sentence.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Sequence

# Prints what identifies an installation, after opening every file named on the command line.
_PROBE = (
    "import json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    open(name, 'rb').close()\n"
    "print(json.dumps([sys.version, sys.base_prefix]))\n"
)


class UidAccessError(RuntimeError):
    """UID cannot run the interpreter (or read a file it needs); the message says what to do."""


@functools.cache
def _identity_as_root(python: str) -> tuple[str, str]:
    out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
    version, base_prefix = json.loads(out.stdout)
    return version, base_prefix


def check_runnable_as(uid: int, python: str, files: Sequence[str] = ()) -> str | None:
    """None when `uid` can run `python` as this process can and read `files`; else why not."""
    if os.geteuid() != 0 or uid == os.geteuid():
        return None  # without root nobody switches UID; with the same UID access is the same
    version, base_prefix = _identity_as_root(python)
    # `env` execs the interpreter after setpriv's own exec has dropped every capability: setpriv keeps
    # CAP_DAC_OVERRIDE across its exec, so a private path would pass here and fail in the app's children.
    argv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "env",
        "--",
        python,
        "-I",
        "-c",
        _PROBE,
    ]
    try:
        out = subprocess.run([*argv, *files], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        return f"UID {uid} cannot start {python}: {exc.strerror}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"UID {uid} cannot run {python} or read the files it needs: {last}"
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if seen != [version, base_prefix]:
        return (
            f"UID {uid} running {python} gets Python {seen[0].split()[0]} from {seen[1]}, not "
            f"{version.split()[0]} from {base_prefix}: the interpreter's home is not readable by UID {uid}"
        )
    return None


def require_runnable_as(uids: Sequence[int], python: str, files: Sequence[str] = ()) -> None:
    """Raise UidAccessError with the fix when one of `uids` cannot run `python` or read `files`."""
    for uid in uids:
        reason = check_runnable_as(uid, python, files)
        if reason is not None:
            raise UidAccessError(
                f"{reason}. Processes here run as other UIDs (app 1000, sidecar 15337), so the interpreter, "
                "its standard library and the checkout must be reachable by every UID: recreate the venv "
                "from a Python outside any private home (`rm -rf .venv && make venv` picks one with "
                "scripts/pick-python.sh), and keep the checkout in a directory others can traverse."
            )
