"""Credential files are created, never written through a planted file or symlink."""

from __future__ import annotations

import pytest

from fedlora.runtime import certs


def test_a_planted_dangling_symlink_is_refused_and_its_target_never_created(tmp_path):
    out = tmp_path / "creds"
    out.mkdir()
    target = tmp_path / "stolen.key"
    (out / "ca.key").symlink_to(target)  # dangling: Path.exists() is False

    with pytest.raises(certs.CertsError, match="refusing"):
        certs.generate(out, nodes=1)

    assert not target.exists()


def test_force_replaces_the_symlink_itself_not_its_target(tmp_path):
    out = tmp_path / "creds"
    out.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (out / "signing-0.key").symlink_to(target)

    certs.generate_signing_keys(out, nodes=1, force=True)

    assert target.read_text() == "keep me"
    key = out / "signing-0.key"
    assert not key.is_symlink() and key.stat().st_mode & 0o777 == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
