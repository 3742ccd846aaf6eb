"""Private directories and state.db whatever the umask: the helpers, the coordinator, a real SuperLink.

Every test runs under umask 000, the worst case (``mkdir`` would then make 0777), and puts
the process's umask back afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedretrain.deploy.filemodes import private_dir, private_file
from fedretrain.registry.signing import generate_keypair
from server.deploy.coordinator import Coordinator, prepare_private_state, start_superlink


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def umask_000() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_the_fixture_really_runs_under_umask_000(tmp_path):
    # The control: a plain mkdir here is world-writable, which is what the helpers prevent.
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "plain") == 0o777


def test_private_dir_makes_every_directory_it_creates_0700(tmp_path):
    # Prepare: tmp_path exists (and is left as it is); a/b/c do not.
    before = _mode(tmp_path)

    # Execute
    made = private_dir(tmp_path / "a" / "b" / "c")

    # Assert
    assert made == tmp_path / "a" / "b" / "c"
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert _mode(tmp_path) == before


def test_private_dir_tightens_an_existing_directory_and_says_so(tmp_path, caplog):
    # Prepare: a key directory an earlier run made under umask 000.
    keys = tmp_path / "keys"
    keys.mkdir()
    assert _mode(keys) == 0o777

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedretrain"):
        private_dir(keys)

    # Assert
    assert _mode(keys) == 0o700
    assert f"{keys} had mode 777; made it 700" in caplog.text


def test_private_dir_refuses_a_file(tmp_path):
    (tmp_path / "keys").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        private_dir(tmp_path / "keys")


def test_private_file_creates_an_empty_0600_file_and_tightens_an_existing_one_keeping_it(tmp_path):
    # Execute / Assert: a new file
    new = private_file(tmp_path / "state.db")
    assert (_mode(new), new.read_bytes()) == (0o600, b"")

    # Prepare / Execute / Assert: an existing 0644 file keeps its bytes
    old = tmp_path / "old.db"
    old.write_bytes(b"SQLite format 3\x00")
    old.chmod(0o644)
    private_file(old)
    assert (_mode(old), old.read_bytes()) == (0o600, b"SQLite format 3\x00")


def test_the_coordinator_directory_is_0700_and_its_database_files_0600(tmp_path):
    # Prepare: a database left 0644 by an earlier SuperLink, with its WAL file.
    coord = Coordinator(tmp_path / "coord")
    coord.root.mkdir()
    for name in ("state.db", "state.db-wal"):
        (coord.root / name).write_bytes(b"x")
        (coord.root / name).chmod(0o644)

    # Execute
    prepare_private_state(coord)

    # Assert
    assert _mode(coord.root) == 0o700
    assert [_mode(coord.root / n) for n in ("state.db", "state.db-wal")] == [0o600, 0o600]
    assert not (coord.root / "state.db-shm").exists()  # nothing is made that was not there


def test_the_coordinators_signing_key_goes_into_a_new_private_directory(tmp_path):
    # Execute: `fedretrain keys coordinator --out keys/signing` under umask 000.
    pair = generate_keypair(tmp_path / "keys" / "signing")

    # Assert: both new directories 0700, the private key 0600, the public key readable.
    assert [_mode(tmp_path / "keys"), _mode(tmp_path / "keys" / "signing")] == [0o700, 0o700]
    assert (_mode(pair.private_path), _mode(pair.public_path)) == (0o600, 0o644)


def test_an_existing_key_directory_is_left_as_its_owner_made_it(tmp_path):
    # A directory the operator chose (it may be shared) is not changed; the key itself is private.
    tmp_path.chmod(0o755)
    pair = generate_keypair(tmp_path)
    assert (_mode(tmp_path), _mode(pair.private_path)) == (0o755, 0o600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_real_superlink_accepts_the_empty_private_database_and_keeps_it_private(tmp_path):
    # Prepare: a fresh coordinator directory; an insecure SuperLink is enough for file modes.
    coord = Coordinator(tmp_path / "coord")
    address = f"127.0.0.1:{_free_port()}"

    # Execute: start it (it answers `flwr supernode ls` before this returns), then stop it.
    proc = start_superlink(coord, address, None, timeout_s=60)
    try:
        wal_modes = {p.name: _mode(p) for p in coord.root.glob("state.db*")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # Assert: SQLite would make state.db 0644 on its own (-wal and -shm taking its mode);
    # here every database file is 0600, and Flower migrated the empty file into its schema.
    assert _mode(coord.root) == 0o700
    assert set(wal_modes) == {"state.db", "state.db-wal", "state.db-shm"}, wal_modes
    assert set(wal_modes.values()) == {0o600}, wal_modes
    assert _mode(coord.database) == 0o600
    with sqlite3.connect(coord.database) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alembic_version", "run", "node"} <= tables, tables
