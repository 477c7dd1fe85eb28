"""Effective policy = pod spec ∩ mounted file: reloads narrow live, never widen; bad files stay out."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from outrider.sidecar.egress.policy import Destination, decide
from outrider.sidecar.egress.reload import PolicyHolder, spec_policy

SPEC = {"version": 1, "layers": [{"source": "cluster default", "allow": ["a.test", "b.test"]}]}


def ok(holder: PolicyHolder, name: str) -> bool:
    return decide(holder.current, Destination(port=443, name=name)).allowed


def holder_for(path: Path) -> PolicyHolder:
    spec, errors = spec_policy(SPEC)
    assert not errors
    holder = PolicyHolder(spec=spec, path=path)
    holder.check()
    return holder


def test_no_file_means_the_pod_spec_policy(tmp_path: Path) -> None:
    holder = holder_for(tmp_path / "missing.yaml")
    assert ok(holder, "a.test") and ok(holder, "b.test") and not ok(holder, "c.test")


def test_file_narrows_live_and_cannot_widen(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    holder = holder_for(path)
    path.write_text("allow: [a.test, c.test]\n")
    assert holder.check()
    assert ok(holder, "a.test") and not ok(holder, "b.test") and not ok(holder, "c.test")
    assert holder.check() is False  # unchanged bytes: nothing to do


def test_bad_file_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    holder = holder_for(path)
    path.write_text("allow: [a.test]\n")
    holder.check()
    path.write_text("allow: [a.test, 'b..test']\n")
    assert holder.check() is False
    assert holder.last_error is not None and "b..test" in holder.last_error and str(path) in holder.last_error
    assert ok(holder, "a.test") and not ok(holder, "b.test")  # still the last good file
    path.write_text("allow: [: not yaml\n")
    assert holder.check() is False and "YAML" in (holder.last_error or "")
    path.write_text("allow: [b.test]\n")
    assert holder.check() and holder.last_error is None and ok(holder, "b.test") and not ok(holder, "a.test")


def test_removed_file_falls_back_to_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    holder = holder_for(path)
    path.write_text("allow: [a.test]\n")
    holder.check()
    path.unlink()
    assert holder.check() and ok(holder, "b.test")


def test_malformed_spec_denies_everything() -> None:
    spec, _ = spec_policy({"layers": "nope"})
    assert not decide(spec, Destination(port=443, name="a.test")).allowed


def test_file_caught_mid_rewrite_never_lifts_the_narrowing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`>` or an editor truncates the file, then writes it: the empty file read in between would lift
    the narrowing (empty = no file). It is never taken; the finished file is, at the next poll."""
    from outrider.sidecar import polled_file

    path = tmp_path / "policy.yaml"
    holder = holder_for(path)
    path.write_text("allow: [a.test]\n")
    assert holder.check() and not ok(holder, "b.test")
    monkeypatch.setattr(polled_file, "SETTLE_S", 0.5)
    path.write_text("")  # truncated: the rewrite lands while check() settles
    writer = threading.Timer(0.1, path.write_text, args=("allow: [a.test, c.test]\n",))
    writer.start()
    try:
        assert holder.check() is False
    finally:
        writer.join()
    assert ok(holder, "a.test") and not ok(holder, "b.test")  # the narrowing held throughout
    assert holder.check() and not ok(holder, "b.test") and not ok(holder, "c.test")
