"""The coordinator's registry on disk: publish, approve, rollback, audits, crashes, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import signal
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.registry import add_keys_commands, add_registry_commands
from fedretrain.errors import KeyFileError, RegistryError
from fedretrain.registry.bundle import ADAPTER_FILES, verify_rollback
from fedretrain.registry.signing import generate_keypair, key_id, load_private_key, verify_signature
from fedretrain.registry.store import Registry

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
BASE = {"name": "tiny-llama", "sha256": "ab" * 32}
LORA = {"r": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def adapter_dir(tiny_adapter_dir) -> Path:
    return tiny_adapter_dir


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _publish(registry: Registry, adapter: Path, key: Ed25519PrivateKey, *, day: int = 0, **kwargs) -> int:
    settings = {
        "base_model": BASE,
        "lora": LORA,
        "run": {"name": f"run-{day}"},
        "sites": {},
        "gate": {"decision": "publish"},
        "expiry_days": 30,
        "now": NOW + timedelta(days=day),
        **kwargs,
    }
    return registry.publish(adapter, signing_key=key, **settings)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_publish_twice_makes_a_chain_of_verified_versions(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path / "registry")

    # Execute
    first = _publish(registry, adapter_dir, key)
    second = _publish(registry, adapter_dir, key, day=1)

    # Assert
    assert (first, second) == (1, 2)
    assert registry.versions() == [1, 2]
    assert registry.champion() == 2
    assert [registry.manifest(v)["parent"] for v in (1, 2)] == [None, 1]
    assert registry.manifest(2)["created_at"] == "2026-11-22T10:00:00Z"
    assert registry.manifest(2)["expires_at"] == "2026-12-22T10:00:00Z"
    assert [registry.status(v) for v in (1, 2)] == ["superseded", "champion"]
    assert registry.verify(1) == [] and registry.verify(2) == []
    for name in ADAPTER_FILES:  # byte-exact copies of what peft wrote
        assert (tmp_path / "registry/versions/000002" / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert json.loads((tmp_path / "registry/champion.json").read_text()) == {
        "version": 2,
        "set_at": "2026-11-22T10:00:00Z",
        "reason": "publish",
        "rollback_sequence": None,
    }
    assert json.loads((tmp_path / "registry/registry.json").read_text())["key_id"] == key_id(key.public_key())
    assert registry.check().problems == ()
    # Each publish appended a signed pointer record; the verified chain's head is the champion.
    records = [pointer.record for _, pointer in registry.pointers()]
    assert [(r["sequence"], r["version"], r["reason"]) for r in records] == [(1, 1, "publish"), (2, 2, "publish")]
    assert registry.verified_champion(key.public_key()).version == 2


def test_a_version_that_requires_approval_waits_until_approved(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path)
    _publish(registry, adapter_dir, key)

    # Execute: published, but pending.
    version = _publish(registry, adapter_dir, key, day=1, require_approval=True)

    # Assert
    assert registry.champion() == 1 and registry.status(2) == "pending"
    with pytest.raises(RegistryError, match="only a pending version"):
        registry.approve(1, signing_key=key, approver="ana")

    # Execute: approved.
    registry.approve(version, signing_key=key, approver="ana", now=NOW + timedelta(days=2))

    # Assert: champion moved; the approval is canonical JSON signed by the registry key.
    assert registry.champion() == 2 and registry.status(2) == "champion"
    payload = (tmp_path / "versions/000002/approval.json").read_bytes()
    verify_signature(key.public_key(), payload, (tmp_path / "versions/000002/approval.sig").read_bytes())
    assert json.loads(payload) == {
        "kind": "approval",
        "version": 2,
        "approver": "ana",
        "created_at": "2026-11-23T10:00:00Z",
        "key_id": key_id(key.public_key()),
    }
    assert json.loads((tmp_path / "champion.json").read_text())["reason"] == "approve"
    with pytest.raises(RegistryError, match="champion"):
        registry.approve(2, signing_key=key, approver="ana")
    assert registry.check().problems == ()


def test_a_pending_version_overtaken_by_a_newer_champion_cannot_come_back(tmp_path, adapter_dir, key) -> None:
    # Prepare: 1 champion, 2 pending, 3 published straight to champion.
    registry = Registry(tmp_path)
    for day, approval in enumerate((False, True, False)):
        _publish(registry, adapter_dir, key, day=day, require_approval=approval)

    # Execute / Assert: 2 was never installed anywhere; neither approve nor rollback may bring it in.
    assert [registry.status(v) for v in (1, 2, 3)] == ["superseded", "superseded", "champion"]
    with pytest.raises(RegistryError, match="superseded"):
        registry.approve(2, signing_key=key, approver="ana")
    with pytest.raises(RegistryError, match="never champion nor approved"):
        registry.rollback(2, signing_key=key, reason="try")


def test_rollback_moves_the_champion_back_with_a_signed_record_and_deletes_nothing(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path)
    for day in range(3):
        _publish(registry, adapter_dir, key, day=day)
    before = _tree(tmp_path / "versions")

    # Execute
    record = registry.rollback(1, signing_key=key, reason="gate regression", now=NOW + timedelta(days=5))

    # Assert: champion 1; 3 was withdrawn, 2 was skipped; every version file is unchanged.
    assert registry.champion() == 1
    assert [registry.status(v) for v in (1, 2, 3)] == ["champion", "superseded", "rolled-back"]
    assert _tree(tmp_path / "versions") == before
    body = verify_rollback(record, registry.public_key(), last_sequence=None)
    assert body == {
        "kind": "rollback",
        "sequence": 1,
        "target_version": 1,
        "from_version": 3,
        "created_at": "2026-11-26T10:00:00Z",
        "reason": "gate regression",
        "key_id": key_id(key.public_key()),
    }
    assert registry.latest_rollback() == record
    assert (tmp_path / "rollbacks/000001.json").read_bytes() == record.payload_bytes
    assert json.loads((tmp_path / "champion.json").read_text())["rollback_sequence"] == 1
    assert registry.check().problems == ()

    # Execute / Assert: only older versions; the next publish builds on the restored champion.
    with pytest.raises(RegistryError, match="older than the champion"):
        registry.rollback(3, signing_key=key, reason="undo")
    assert _publish(registry, adapter_dir, key, day=6) == 4
    assert registry.manifest(4)["parent"] == 1
    assert [registry.status(v) for v in (2, 3, 4)] == ["superseded", "rolled-back", "champion"]


def test_the_registry_is_pinned_to_its_first_signing_key(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path)
    _publish(registry, adapter_dir, key)
    _publish(registry, adapter_dir, key, day=1)
    other = Ed25519PrivateKey.generate()
    before = _tree(tmp_path)

    # Execute / Assert: every write with another key is refused and writes nothing.
    with pytest.raises(RegistryError, match=f"pinned to signing key {key_id(key.public_key())}"):
        _publish(registry, adapter_dir, other, day=2)
    with pytest.raises(RegistryError, match="pinned"):
        registry.rollback(1, signing_key=other, reason="x")
    assert _tree(tmp_path) == before
    assert registry.versions() == [1, 2]


def test_concurrent_publishers_get_distinct_versions(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path)
    errors: list[BaseException] = []

    def publish(day: int) -> None:
        try:
            _publish(Registry(tmp_path), adapter_dir, key, day=day)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    # Execute: four writers at once; the flock serialises them.
    threads = [threading.Thread(target=publish, args=(day,)) for day in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert errors == []
    assert registry.versions() == [1, 2, 3, 4]
    assert sorted(registry.manifest(v)["parent"] or 0 for v in range(1, 5)) == [0, 1, 2, 3]
    assert registry.check().problems == ()


_CRASHING_PUBLISH = """
import json, os, signal, sys
from pathlib import Path
import fedretrain.registry.store as store
from fedretrain.registry.signing import load_private_key

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

store._write_manifest = die
root, adapter, key, base, lora = sys.argv[1:6]
store.Registry(root).publish(Path(adapter), signing_key=load_private_key(key), base_model=json.loads(base),
                             lora=json.loads(lora), run={}, sites={}, gate={}, expiry_days=30)
"""


def test_a_publish_killed_before_its_manifest_leaves_the_registry_intact(tmp_path, adapter_dir) -> None:
    # Prepare
    pair = generate_keypair(tmp_path / "keys")
    key = load_private_key(pair.private_path)
    registry = Registry(tmp_path / "registry")
    _publish(registry, adapter_dir, key)

    # Execute: a publisher killed between writing the adapter files and the manifest.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CRASHING_PUBLISH,
            str(registry.root),
            str(adapter_dir),
            str(pair.private_path),
            json.dumps(BASE),
            json.dumps(LORA),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )

    # Assert: it died by SIGKILL; nothing a reader sees changed; the leftover is only a note.
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    staging = list((registry.root / "versions").glob(".staging-*"))
    assert len(staging) == 1 and sorted(p.name for p in staging[0].iterdir()) == sorted(ADAPTER_FILES)
    assert registry.versions() == [1] and registry.champion() == 1
    report = registry.check()
    assert report.problems == ()
    assert any(".staging-" in note and "interrupted publish" in note for note in report.notes)

    # Execute / Assert: the next publish still works.
    assert _publish(registry, adapter_dir, key, day=1) == 2
    assert registry.champion() == 2 and registry.check().problems == ()


_DYING_POINTER = """
import json, os, signal, sys
from pathlib import Path
import fedretrain.registry.store as store
from fedretrain.registry.signing import load_private_key

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

store.sign_pointer = die
root, adapter, key, base, lora = sys.argv[1:6]
store.Registry(root).publish(Path(adapter), signing_key=load_private_key(key), base_model=json.loads(base),
                             lora=json.loads(lora), run={}, sites={}, gate={}, expiry_days=30)
"""


def test_a_publish_killed_before_its_pointer_record_is_refused_until_its_version_is_moved_aside(
    tmp_path, adapter_dir
) -> None:
    # Prepare
    pair = generate_keypair(tmp_path / "keys")
    key = load_private_key(pair.private_path)
    registry = Registry(tmp_path / "registry")
    _publish(registry, adapter_dir, key)

    # Execute: a publisher killed after its version is in place, before its pointer record.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _DYING_POINTER,
            str(registry.root),
            str(adapter_dir),
            str(pair.private_path),
            json.dumps(BASE),
            json.dumps(LORA),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )

    # Assert: version 2 exists but no record names it: the audit and the next publish refuse, naming it.
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert registry.versions() == [1, 2] and registry.champion() == 1
    problems = registry.check(key.public_key()).problems
    assert len(problems) == 1 and "version 2 was published straight to champion" in problems[0]
    assert f"move it out of versions/, e.g. to {registry.root}/versions/.interrupted-000002" in problems[0]
    with pytest.raises(RegistryError, match="publish was interrupted"):
        _publish(registry, adapter_dir, key, day=1)

    # Execute / Assert: moved aside as the message says (no site ever had it), publishing works again.
    (registry.root / "versions/000002").rename(registry.root / "versions/.interrupted-000002")
    assert registry.check(key.public_key()).problems == ()
    assert _publish(registry, adapter_dir, key, day=1) == 2
    assert registry.verified_champion(key.public_key()).version == 2 and registry.manifest(2)["parent"] == 1


def test_check_reports_a_tampered_version(tmp_path, adapter_dir, key) -> None:
    # Prepare
    registry = Registry(tmp_path)
    _publish(registry, adapter_dir, key)
    weights = tmp_path / "versions/000001/adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    # Execute
    report = registry.check()

    # Assert
    assert len(report.problems) == 1
    assert report.problems[0].startswith("version 1: hashes:")


def test_decisions_and_pseudonyms(tmp_path) -> None:
    # Prepare
    registry = Registry(tmp_path)

    # Execute
    registry.record_decision({"round": 3, "decision": "publish"})
    registry.record_decision({"round": 4, "decision": "reject", "reason": "worse than champion"})
    alias = registry.pseudonym("hospital-a")

    # Assert: decisions in order; the pseudonym is HMAC-SHA256 under the 0600 key file.
    assert registry.decisions() == [
        {"round": 3, "decision": "publish"},
        {"round": 4, "decision": "reject", "reason": "worse than champion"},
    ]
    secret = (tmp_path / "pseudonym.key").read_bytes()
    assert len(secret) == 32
    assert stat.S_IMODE((tmp_path / "pseudonym.key").stat().st_mode) == 0o600
    assert alias == "s-" + hmac.new(secret, b"hospital-a", hashlib.sha256).hexdigest()[:12]
    assert registry.pseudonym("hospital-a") == alias != registry.pseudonym("hospital-b")
    with pytest.raises(RegistryError, match="plain JSON"):
        registry.record_decision({"score": float("nan")})


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedretrain")
    sub = parser.add_subparsers(dest="command", required=True)
    add_keys_commands(sub)
    add_registry_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_the_commands(tmp_path, adapter_dir, capsys) -> None:
    # Prepare: keys through the CLI, versions through the registry.
    keys, root = tmp_path / "keys", str(tmp_path / "registry")
    assert _cli("keys", "coordinator", "--out", str(keys)) == 0
    with pytest.raises(KeyFileError, match="--force"):
        _cli("keys", "coordinator", "--out", str(keys))
    key = load_private_key(keys / "coordinator.key")
    registry = Registry(root)
    for day, approval in enumerate((False, False, True)):
        _publish(registry, adapter_dir, key, day=day, require_approval=approval)
    capsys.readouterr()

    # Execute / Assert: list marks the champion; show prints the manifest and status.
    assert _cli("registry", "list", "--root", root) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("*") and "champion" in rows[2] and "run-1" in rows[2] and "publish" in rows[2]
    assert "pending" in rows[3]
    assert _cli("registry", "show", "2", "--root", root) == 0
    shown = capsys.readouterr().out
    assert '"parent": 1' in shown and shown.rstrip().endswith("status: champion")

    # Execute / Assert: approve, rollback, verify.
    assert (
        _cli("registry", "approve", "3", "--key", str(keys / "coordinator.key"), "--approver", "ana", "--root", root)
        == 0
    )
    assert (
        _cli("registry", "rollback", "1", "--key", str(keys / "coordinator.key"), "--reason", "bad", "--root", root)
        == 0
    )
    assert registry.champion() == 1 and registry.latest_rollback().record["reason"] == "bad"
    capsys.readouterr()
    assert _cli("registry", "verify", "--root", root) == 0
    assert "NOT AUTHENTICATED" in capsys.readouterr().out
    assert _cli("registry", "verify", "--root", root, "--pubkey", str(keys / "coordinator.pub")) == 0
    assert "verifies with key" in capsys.readouterr().out
    assert _cli("registry", "verify", "2", "--root", root, "--pubkey", str(keys / "coordinator.pub")) == 0
    other = generate_keypair(tmp_path / "other")
    assert _cli("registry", "verify", "2", "--root", root, "--pubkey", str(other.public_path)) == 1
    assert f"registry.json pins signing key {key_id(key.public_key())}, not the given key" in capsys.readouterr().out

    # Execute / Assert: a file changed on disk fails verify with exit 1.
    (Path(root) / "versions/000002/adapter_config.json").write_text("{}")
    capsys.readouterr()
    assert _cli("registry", "verify", "--root", root) == 1
    assert "PROBLEM version 2: hashes:" in capsys.readouterr().out
    assert _cli("registry", "verify", "1", "--root", root) == 0
