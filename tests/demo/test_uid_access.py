"""The check that another UID can run the venv's interpreter (app UID 1000, sidecar UID 15337)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from outrider.sidecar.demo.uid_access import UidAccessError, check_runnable_as, require_runnable_as

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to switch UID"
)


def test_the_venv_python_and_the_checkout_are_reachable_by_the_app_and_sidecar_uids() -> None:
    # What `make venv` guarantees (scripts/pick-python.sh): tests of other areas rely on it.
    require_runnable_as([1000, 15337], sys.executable, [__file__])


def test_an_interpreter_behind_a_private_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    link = private / "python3"
    link.symlink_to(os.path.realpath(sys.executable))
    reason = check_runnable_as(1000, str(link))
    assert reason is not None and "UID 1000" in reason and str(link) in reason
    with pytest.raises(UidAccessError, match=r"make venv.*pick-python"):
        require_runnable_as([1000], str(link))


def test_a_file_the_uid_cannot_read_is_named(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    secret = tmp_path / "app_client.py"
    secret.write_text("")
    secret.chmod(0o600)
    reason = check_runnable_as(1000, sys.executable, [str(secret)])
    assert reason is not None and "Permission denied" in reason
    assert check_runnable_as(0, sys.executable, [str(secret)]) is None
