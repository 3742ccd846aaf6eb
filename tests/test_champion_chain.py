"""The signed champion chain: publish, approve and rollback each append a signed, hash-linked pointer
record; `fedretrain registry verify --pubkey`, a publish and a site all refuse a registry folder (or a
delivery made from one) whose pointer was edited, cut, replayed, reordered or re-signed, or whose pin
was swapped. Real registry files, real Ed25519 keys, the real CLI entry; no training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.main import main
from client.install.installer import receive_version
from client.install.model_store import ModelStore
from client.round.site import site_model
from fedretrain.config import Job, SiteConfig, compose_config
from fedretrain.errors import RegistryError, VerificationError
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import load_adapter_arrays
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import RollbackRecord, VersionBundle
from fedretrain.registry.manifest import sha256_hex
from fedretrain.registry.pointer import ChampionPointer, sign_pointer
from fedretrain.registry.sidecar import write_pin
from fedretrain.registry.signing import canonical_json, generate_keypair, key_id, load_private_key, sign
from fedretrain.registry.store import Registry
from server.cycle.publish import RegistryHandle, champion_adapter

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "site-a"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def job() -> Job:
    return Job.from_config(compose_config(["experiment=smoke"]), run_id="chain-test")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, job) -> list[Path]:
    """Three different, finite adapters that fit the smoke job's embedded model."""
    lm = site_model(job, "cpu")
    out = []
    for number in (1, 2, 3):
        rng = np.random.default_rng(number)
        load_adapter_arrays(
            lm, {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape, _ in lm.spec.entries}
        )
        directory = tmp_path_factory.mktemp(f"adapter-{number}")
        lm.model.save_pretrained(str(directory))
        out.append(directory)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    pair = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(pair.private_path), pair.public_path


def _publish(
    registry: Registry, adapter: Path, key: Ed25519PrivateKey, job: Job, day: int, require_approval: bool = False
) -> int:
    identity = base_model_identity("embedded", Path(resolve_model_path("embedded")))
    return registry.publish(
        adapter,
        signing_key=key,
        base_model=identity,
        lora=job.lora.to_manifest(site_model(job, "cpu").target_modules),
        run={"name": f"run-{day}"},
        sites={},
        gate={"decision": "publish"},
        expiry_days=30,
        require_approval=require_approval,
        now=NOW + timedelta(days=day),
    )


def _history(root: Path, adapters: list[Path], key: Ed25519PrivateKey, job: Job) -> Registry:
    """v1 published, v2 published pending then approved, v3 published, rolled back to v2: records 1-4."""
    registry = Registry(root)
    _publish(registry, adapters[0], key, job, day=0)
    _publish(registry, adapters[1], key, job, day=1, require_approval=True)
    registry.approve(2, signing_key=key, approver="ana", now=NOW + timedelta(days=2))
    _publish(registry, adapters[2], key, job, day=3)
    registry.rollback(2, signing_key=key, reason="regression", now=NOW + timedelta(days=4))
    return registry


@pytest.fixture(scope="module")
def honest(tmp_path_factory, adapters, keys, job) -> Registry:
    return _history(tmp_path_factory.mktemp("honest") / "registry", adapters, keys[0], job)


@pytest.fixture
def registry(tmp_path, honest) -> Registry:
    """A copy of the honest registry that a test may tamper with."""
    shutil.copytree(honest.root, tmp_path / "registry")
    return Registry(tmp_path / "registry")


def _verify(registry: Registry, pubkey: Path | None, capsys) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["registry", "verify", "--root", str(registry.root)] + ([] if pubkey is None else ["--pubkey", str(pubkey)])
    code = main(argv)
    return code, capsys.readouterr().out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pointer_file(registry: Registry, number: int) -> Path:
    return registry.root / "pointers" / f"{number:06d}.json"


def _write_champion_copy(registry: Registry, version: int, reason: str = "publish", sequence=None) -> None:
    (registry.root / "champion.json").write_text(
        json.dumps(
            {"version": version, "set_at": "2026-01-01T00:00:00Z", "reason": reason, "rollback_sequence": sequence}
        )
    )


# -- the happy paths --------------------------------------------------------------------------------------------


def test_every_move_of_the_champion_appends_a_signed_linked_record(honest, keys, capsys) -> None:
    # Prepare
    key, public = keys
    records = [pointer.record for _, pointer in honest.pointers()]
    payloads = [pointer.payload_bytes for _, pointer in honest.pointers()]
    manifests = {v: (honest.version_dir(v) / "manifest.json").read_bytes() for v in (1, 2, 3)}

    # Assert: publish 1, approve 2, publish 3, rollback to 2 (record 1), linked by hash, each for its manifest.
    assert [(r["sequence"], r["version"], r["reason"], r["rollback_sequence"]) for r in records] == [
        (1, 1, "publish", None),
        (2, 2, "approve", None),
        (3, 3, "publish", None),
        (4, 2, "rollback", 1),
    ]
    assert records[0]["previous_sha256"] is None
    assert [r["previous_sha256"] for r in records[1:]] == [sha256_hex(p) for p in payloads[:-1]]
    assert [r["manifest_sha256"] for r in records] == [sha256_hex(manifests[v]) for v in (1, 2, 3, 2)]
    assert {r["key_id"] for r in records} == {key_id(key.public_key())}
    assert records[1]["created_at"] == (NOW + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The second version's parent is the first; the chain's head is the champion; the copy agrees.
    assert honest.manifest(3)["parent"] == 2
    assert honest.verified_champion(key.public_key()).version == 2
    assert json.loads((honest.root / "champion.json").read_text())["rollback_sequence"] == 1

    # Execute / Assert: the CLI verifies it with the key from outside the folder.
    code, out = _verify(honest, public, capsys)
    assert code == 0, out
    assert f"verifies with key {key_id(key.public_key())} from {public}" in out


def test_each_step_verifies_and_the_next_parent_comes_from_the_chain(tmp_path, adapters, keys, job, capsys) -> None:
    # Prepare
    key, public = keys
    registry = Registry(tmp_path / "registry")

    # Execute / Assert: after each move the whole registry verifies with --pubkey.
    _publish(registry, adapters[0], key, job, day=0)
    assert _verify(registry, public, capsys)[0] == 0
    _publish(registry, adapters[1], key, job, day=1, require_approval=True)
    assert _verify(registry, public, capsys)[0] == 0 and registry.verified_champion(key.public_key()).version == 1
    registry.approve(2, signing_key=key, approver="ana")
    assert _verify(registry, public, capsys)[0] == 0
    _publish(registry, adapters[2], key, job, day=3)
    registry.rollback(1, signing_key=key, reason="regression")
    assert _verify(registry, public, capsys)[0] == 0
    assert _publish(registry, adapters[0], key, job, day=5) == 4

    # Assert: the new version's parent is the rolled-back-to champion, and the cycle's baseline is 4.
    assert registry.manifest(4)["parent"] == 1
    assert champion_adapter(RegistryHandle(registry, key, 30.0)).version == 4


def test_without_pubkey_verify_says_it_only_checked_the_key_in_the_folder(honest, capsys) -> None:
    code, out = _verify(honest, None, capsys)

    assert code == 0
    assert "NOT AUTHENTICATED" in out and f"{honest.root}/registry.json" in out and "--pubkey" in out


# -- attacks on the folder ------------------------------------------------------------------------------------


def _relabel_champion_copy(registry: Registry, key) -> None:
    _write_champion_copy(registry, 3)  # champion.json alone says 3


def _relabel_as_pending(registry: Registry, key) -> None:
    # The attack on a registry where 3 was published straight to champion (records 1-3):
    # cut record 3, say 2 is champion, and mark 3 as waiting for approval.
    for number in (4, 3):
        _pointer_file(registry, number).unlink()
        _pointer_file(registry, number).with_suffix(".sig").unlink()
    (registry.root / "rollbacks").rename(registry.root.parent / "rollbacks-aside")
    (registry.version_dir(3) / "approval.required").write_bytes(b"")
    _write_champion_copy(registry, 2, "approve")


def _edit_a_record(registry: Registry, key) -> None:
    path = _pointer_file(registry, 4)
    path.write_bytes(path.read_bytes().replace(b'"version":2', b'"version":3'))
    _write_champion_copy(registry, 3, "rollback", 1)


def _delete_a_middle_record(registry: Registry, key) -> None:
    _pointer_file(registry, 2).unlink()
    _pointer_file(registry, 2).with_suffix(".sig").unlink()


def _delete_the_last_record(registry: Registry, key) -> None:
    _pointer_file(registry, 4).unlink()
    _pointer_file(registry, 4).with_suffix(".sig").unlink()
    _write_champion_copy(registry, 3)  # a careful attacker keeps the copy consistent with record 3


def _replay_an_old_record(registry: Registry, key) -> None:
    for suffix in (".json", ".sig"):
        shutil.copy(_pointer_file(registry, 1).with_suffix(suffix), _pointer_file(registry, 5).with_suffix(suffix))
    _write_champion_copy(registry, 1)


def _reorder_records(registry: Registry, key) -> None:
    for suffix in (".json", ".sig"):
        two, three = _pointer_file(registry, 2).with_suffix(suffix), _pointer_file(registry, 3).with_suffix(suffix)
        data = two.read_bytes()
        two.write_bytes(three.read_bytes())
        three.write_bytes(data)


def _append_a_record_signed_by_another_key(registry: Registry, key) -> None:
    head = registry.pointers()[-1][1]
    pointer = sign_pointer(
        Ed25519PrivateKey.generate(),
        sequence=5,
        version=1,
        reason="publish",
        created_at=NOW,
        manifest_bytes=(registry.version_dir(1) / "manifest.json").read_bytes(),
        previous=head,
    )
    _pointer_file(registry, 5).write_bytes(pointer.payload_bytes)
    _pointer_file(registry, 5).with_suffix(".sig").write_bytes(pointer.signature)
    _write_champion_copy(registry, 1)


def _append_an_unsigned_record(registry: Registry, key) -> None:
    head = registry.pointers()[-1][1]
    body = dict(
        head.record,
        sequence=5,
        version=3,
        reason="publish",
        rollback_sequence=None,
        manifest_sha256=sha256_hex((registry.version_dir(3) / "manifest.json").read_bytes()),
        previous_sha256=head.sha256,
    )
    _pointer_file(registry, 5).write_bytes(canonical_json(body))
    _write_champion_copy(registry, 3)


def _swap_the_pin(registry: Registry, key) -> None:
    other = Ed25519PrivateKey.generate()
    write_pin(registry.root / "registry.json", other.public_key())


def _delete_the_pin(registry: Registry, key) -> None:
    (registry.root / "registry.json").unlink()


ATTACKS: dict[str, tuple[Callable[[Registry, Ed25519PrivateKey], None], str]] = {
    # name: (tampering, the file the refusal names)
    "champion.json edited": (_relabel_champion_copy, "champion.json"),
    "v3 relabelled as pending, its record cut": (_relabel_as_pending, "versions/000003"),
    "a record edited": (_edit_a_record, "pointers/000004.json"),
    "a middle record deleted": (_delete_a_middle_record, "pointers/000003.json"),
    "the last record deleted": (_delete_the_last_record, "rollbacks/000001.json"),
    "an old record replayed": (_replay_an_old_record, "pointers/000005.json"),
    "records reordered": (_reorder_records, "pointers/000002.json"),
    "a record signed by another key": (_append_a_record_signed_by_another_key, "pointers/000005.json"),
    "an unsigned record": (_append_an_unsigned_record, "pointers/000005.json"),
    "the pin swapped": (_swap_the_pin, "registry.json"),
    "the pin deleted": (_delete_the_pin, "registry.json"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_registry_verify_refuses_a_tampered_chain(registry, keys, attack, capsys) -> None:
    # Prepare
    tamper, named = ATTACKS[attack]
    tamper(registry, keys[0])

    # Execute
    code, out = _verify(registry, keys[1], capsys)

    # Assert: exit 1, and a problem names the file at fault.
    assert code == 1, out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert any(named in line for line in problems), out


@pytest.mark.parametrize("attack", [a for a in ATTACKS if not a.startswith("the pin")])
def test_publish_and_the_cycle_baseline_refuse_a_tampered_chain(registry, adapters, keys, job, attack) -> None:
    # Prepare
    key = keys[0]
    ATTACKS[attack][0](registry, key)
    before = _tree(registry.root)

    # Execute / Assert: no baseline, no publish, and nothing written.
    with pytest.raises(RegistryError, match=r"champion\.json|pointers|rollbacks|versions/000003"):
        champion_adapter(RegistryHandle(registry, key, 30.0))
    with pytest.raises(RegistryError, match=r"champion\.json|pointers|rollbacks|versions/000003"):
        _publish(registry, adapters[0], key, job, day=9)
    assert _tree(registry.root) == before


@pytest.mark.parametrize("attack", ["the pin swapped", "the pin deleted"])
def test_a_swapped_or_deleted_pin_refuses_every_write_with_the_real_key(registry, adapters, keys, job, attack) -> None:
    ATTACKS[attack][0](registry, keys[0])
    before = _tree(registry.root)

    with pytest.raises(RegistryError, match=r"registry\.json|pinned to signing key"):
        _publish(registry, adapters[0], keys[0], job, day=9)
    with pytest.raises(RegistryError, match=r"registry\.json|pinned to signing key"):
        registry.rollback(1, signing_key=keys[0], reason="x")
    assert _tree(registry.root) == before


def test_a_registry_resigned_with_another_key_passes_only_without_pubkey(tmp_path, adapters, keys, job, capsys) -> None:
    # Prepare: the attacker rebuilds the same history with their own key and swaps it in.
    attacker = Ed25519PrivateKey.generate()
    forged = _history(tmp_path / "registry", adapters, attacker, job)

    # Execute
    unauthenticated, said = _verify(forged, None, capsys)
    code, out = _verify(forged, keys[1], capsys)

    # Assert: consistent with itself, and said so; refused with the outside key, naming the pin.
    assert unauthenticated == 0 and "NOT AUTHENTICATED" in said
    assert code == 1 and f"PROBLEM {forged.root}/registry.json pins signing key {key_id(attacker.public_key())}" in out
    assert "pointers/000001.json: not signed by the pinned key" in out


def test_the_installed_command_exits_non_zero(registry, keys) -> None:
    _swap_the_pin(registry, keys[0])
    command = Path(sys.executable).parent / "fedretrain"

    proc = subprocess.run(
        [str(command), "registry", "verify", "--root", str(registry.root), "--pubkey", str(keys[1])],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 1
    assert f"{registry.root}/registry.json pins signing key" in proc.stdout


def test_a_registry_without_a_chain_is_refused_with_a_way_forward(registry, keys, capsys) -> None:
    # A registry from before signed pointers: champion.json and no pointers/.
    shutil.rmtree(registry.root / "pointers")

    code, out = _verify(registry, keys[1], capsys)

    assert code == 1 and "champion.json is not backed by a signed champion chain" in out
    assert "publish into a new registry folder" in out


# -- attacks on what reaches a site ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def follower(tmp_path_factory, honest, keys, job) -> SiteConfig:
    """A site that followed every honest move: now on version 2 by rollback record 1, pointer 4."""
    site = _site(tmp_path_factory.mktemp("follower"), keys[1])
    for version, rollback in ((1, None), (2, None), (3, None), (2, honest.latest_rollback())):
        receive_version(site, job, _delivered(honest, version, rollback is not None), rollback)
    return site


def _site(root: Path, key: Path) -> SiteConfig:
    shutil.copytree(EXAMPLE, root / "site", dirs_exist_ok=True)
    return SiteConfig(
        site_id="site-a",
        data_dir=str(root / "site"),
        epsilon_ceiling=8.0,
        delta=1e-5,
        coordinator_key=str(key),
        device="cpu",
    )


def _delivered(registry: Registry, version: int, by_rollback: bool = False) -> VersionBundle:
    """``version`` as the coordinator sent it when it became champion (the last record naming it)."""
    pointer = [
        p
        for _, p in registry.pointers()
        if p.record["version"] == version and (p.record["reason"] == "rollback") == by_rollback
    ][-1]
    return replace(registry.bundle(version), pointer=pointer)


def _with(bundle: VersionBundle, pointer: ChampionPointer | None) -> VersionBundle:
    return replace(bundle, pointer=pointer)


def _site_attacks(honest: Registry, key: Ed25519PrivateKey, job: Job, tmp_path: Path) -> dict:
    v1, v3 = honest.bundle(1), honest.bundle(3)
    head = honest.pointers()[-1][1]
    other = Ed25519PrivateKey.generate()
    forged = _history(tmp_path / "forged", [honest.version_dir(v) for v in (1, 2, 3)], other, job)
    edited = ChampionPointer(head.payload_bytes.replace(b'"version":2', b'"version":3'), head.signature)
    by_other = sign_pointer(
        other, sequence=5, version=3, reason="publish", created_at=NOW, manifest_bytes=v3.manifest_bytes, previous=head
    )
    # A rollback to 1 whose pointer the real key signed but whose rollback record another key signed.
    body = dict(honest.latest_rollback().record, sequence=2, target_version=1, from_version=2)
    rollback = RollbackRecord(canonical_json(body), sign(other, canonical_json(body)))
    rollback_pointer = sign_pointer(
        key,
        sequence=5,
        version=1,
        reason="rollback",
        created_at=NOW,
        manifest_bytes=v1.manifest_bytes,
        previous=head,
        rollback_sequence=2,
    )
    return {
        # name: (bundle, rollback, the check that refuses)
        "an edited record": (_with(v3, edited), None, "signature"),
        "an old record replayed": (_delivered(honest, 3), None, "pointer"),
        "a record signed by another key": (_with(v3, by_other), None, "signature"),
        "a registry re-signed by another key": (forged.bundle(2), forged.latest_rollback(), "signature"),
        "a version without its record": (_with(v3, None), None, "pointer"),
        "a record for another version": (_with(v3, head), None, "pointer"),
        "a rollback signed by another key": (_with(v1, rollback_pointer), rollback, "signature"),
    }


def test_a_site_refuses_pointers_not_signed_by_its_pin_or_not_newer(tmp_path, honest, keys, job, follower) -> None:
    # Prepare: each case starts from a copy of the site that followed the chain to record 4.
    attacks = _site_attacks(honest, keys[0], job, tmp_path)

    for number, (name, (bundle, rollback, check)) in enumerate(attacks.items()):
        site = replace(follower, data_dir=str(tmp_path / f"site-{number}"))
        shutil.copytree(follower.data_dir, site.data_dir)

        # Execute
        with pytest.raises(VerificationError) as refused:
            receive_version(site, job, bundle, rollback)

        # Assert: refused by the named check; the site stays on version 2.
        assert refused.value.check == check, (name, refused.value)
        assert ModelStore(site.model_store_path).state().current == 2, name


def test_a_site_accepts_the_same_champion_again_but_not_an_older_record_for_it(
    tmp_path, honest, keys, job, follower
) -> None:
    # Prepare
    site = replace(follower, data_dir=str(tmp_path / "site"))
    shutil.copytree(follower.data_dir, site.data_dir)

    # Execute / Assert: the start-of-cycle re-send of the champion is nothing to do ...
    again = receive_version(site, job, _delivered(honest, 2, by_rollback=True), honest.latest_rollback())
    assert again.metrics["already-current"] == 1
    # ... but the record that first made version 2 champion (record 2) is a replay.
    with pytest.raises(VerificationError, match="replayed pointer record"):
        receive_version(site, job, _delivered(honest, 2))


def test_a_site_installs_an_approved_version_with_its_approve_record(tmp_path, honest, keys, job) -> None:
    site = _site(tmp_path, keys[1])
    receive_version(site, job, _delivered(honest, 1))

    outcome = receive_version(site, job, _delivered(honest, 2))

    assert outcome.metrics["installed-version"] == 2
    assert json.loads((site.model_store_path / "pointer.json").read_text())["sequence"] == 2
