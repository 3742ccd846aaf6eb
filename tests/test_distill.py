"""Distillation for small sites: a student built from its teacher's layers, trained towards the
teacher, gated against it, signed and stored beside it; sent to the sites that chose it, which
verify it against the version they run before they answer with it; tampered students refused."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from test_model_families import FAMILIES, InlineGrid, one_round  # noqa: F401 - InlineGrid for one_round

from client.install.generate import generate
from client.install.student import receive_student, student_dir
from fedretrain.config import compose_config
from fedretrain.errors import RegistryError, VerificationError
from fedretrain.registry.manifest import sha256_hex
from fedretrain.registry.signing import generate_keypair, load_private_key
from fedretrain.registry.store import Registry
from fedretrain.registry.student import StudentBundle, load_student, verify_student
from fedretrain.training.distill import build_student, distill, distillation_loss, student_layers
from server.cycle.report import format_student
from simulation.federation import FederationSites

NOW = datetime.now(UTC)


def tiny_llama(layers: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("teacher", "asked", "kept"), [(4, None, (0, 3)), (4, 3, (0, 2, 3)), (6, None, (0, 2, 5)), (2, None, (0,))]
)
def test_a_student_keeps_evenly_spaced_layers_of_its_teacher(teacher, asked, kept):
    assert student_layers(teacher, asked) == kept


@pytest.mark.parametrize("asked", [0, 4, 5])
def test_a_student_as_large_as_its_teacher_or_empty_is_refused(asked):
    with pytest.raises(ValueError, match="distill.layers"):
        student_layers(4, asked)


def test_the_student_starts_from_the_teachers_weights_and_learns_towards_it():
    # Prepare: a 4-layer teacher
    teacher = tiny_llama(4)

    # Execute
    student, kept = build_student(teacher, None)

    # Assert: the teacher's first and last layers, renumbered 0 and 1; embeddings and norm copied
    assert kept == (0, 3) and student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])

    # Execute: distil on random token sequences
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(ids, torch.ones_like(ids))

    def kl() -> float:
        with torch.no_grad():
            return float(
                distillation_loss(student(ids).logits, teacher(ids).logits, ids, torch.ones_like(ids), 1.0, 1.0)
            )

    before = kl()
    losses = distill(teacher, student, data, steps=30, batch_size=8, lr=0.01, temperature=1.0, alpha=1.0, seed=0)

    # Assert: the student's divergence from its teacher fell
    assert len(losses) == 30 and kl() < 0.5 * before


def test_padding_never_enters_the_distillation_loss():
    teacher, student = tiny_llama(2), tiny_llama(1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    other = ids.clone()
    other[:, 6:] = 7  # different tokens under the padding only
    with torch.no_grad():
        a = distillation_loss(student(ids).logits, teacher(ids).logits, ids, mask, 2.0, 0.5)
        b = distillation_loss(student(other).logits, teacher(other).logits, other, mask, 2.0, 0.5)
    assert torch.allclose(a, b)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One cycle of two sites on a two-layer Llama with distillation on; site-01 chose the student."""
    from fedretrain.modeling.loading import load_tokenizer

    root = tmp_path_factory.mktemp("distill")
    tokenizer = load_tokenizer("embedded")
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config_cls, model_cls, sizes, _ = FAMILIES["llama"]
    transformers.set_seed(0)
    model_cls(config_cls(vocab_size=len(tokenizer), **special, **{**sizes, "num_hidden_layers": 2})).save_pretrained(
        root / "model"
    )
    tokenizer.save_pretrained(root / "model")
    overrides = [
        "distill.enabled=true",
        "distill.steps=4",
        "distill.tolerance=100",
        "simulation.student_sites=[site-01]",
    ]
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    with (
        pytest.MonkeyPatch.context() as patch
    ):  # what Flower's ServerApp runtime sets (conftest's instruction_identity)
        patch.setattr(TaskIdentity, "_run_id", 1)
        patch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        patch.setattr(TaskIdentity, "_task_id", 1)
        summary = one_round(root / "model", root, overrides)
    return root, summary


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
def test_a_cycle_distils_signs_and_sends_the_student_to_the_site_that_chose_it(federation):
    root, summary = federation
    version = summary["published_version"]

    # Assert: the student was gated against its teacher and stored beside it ...
    student = summary["student"]
    assert student["decision"] == "passed" and student["version"] == version
    assert student["architecture"]["layers"] == 1 and student["architecture"]["teacher_layers"] == 2
    assert 0 < student["size_share"] < 1 and student["ci_low"] <= student["gap"] <= student["ci_high"]
    registry = Registry(root / "sites" / "coordinator" / "registry")
    stored = registry.student(version)
    assert stored is not None and stored.manifest["gate"]["decision"] == "passed"
    # ... it went to site-01 only, which verified and installed it ...
    sent = summary["publication"]["students"]
    assert set(sent["installed"]) == {"site-01"} and not sent["refused"] and not sent["waiting"]
    assert "student of version" in format_student(student)
    sites = FederationSites(root / "sites")
    student_site = sites_config(sites, 1)
    assert student_dir(model_store(student_site), version).is_dir()
    assert not (Path(sites_config(sites, 0).model_store_path) / "students").exists()
    # ... and answers with it there.
    out = generate(
        Path(student_site.model_store_path),
        "Chief complaint:",
        coordinator_key=Path(str(student_site.coordinator_key)),
        max_new_tokens=4,
        variant="student",
    )
    assert out.version == version and out.new_tokens == 4


def sites_config(sites: FederationSites, index: int):
    from fedretrain.config.site import site_config_from_node_config

    node_config = json.loads((sites.root / sites.site_ids[index] / "site.json").read_text())
    return site_config_from_node_config(node_config, simulation=True)


def model_store(site):
    from client.install.model_store import ModelStore

    return ModelStore(Path(site.model_store_path))


@pytest.fixture
def signed(federation):
    """The stored student, its teacher's manifest, the registry, the coordinator's private key."""
    root, summary = federation
    registry = Registry(root / "sites" / "coordinator" / "registry")
    version = summary["published_version"]
    key = load_private_key(root / "sites" / "coordinator" / "keys" / "coordinator.key")
    return registry.student(version), registry.bundle(version).manifest_bytes, registry, key


def resign(bundle: StudentBundle, key, files=None, **edits) -> StudentBundle:
    files = dict(files or bundle.files)
    manifest = {**bundle.manifest, **edits}
    manifest["files"] = {name: sha256_hex(data) for name, data in files.items()}
    return StudentBundle.signed(manifest, files, key)


def weights_changed(bundle: StudentBundle, change) -> dict[str, bytes]:
    tensors = safetensors.torch.load(bundle.files["model.safetensors"])
    change(tensors)
    return {**bundle.files, "model.safetensors": safetensors.torch.save(tensors)}


def nan_weight(tensors):
    tensors[sorted(tensors)[0]][0] = float("nan")


def drop_weight(tensors):
    del tensors[sorted(k for k in tensors if "layers.0" in k)[0]]


@pytest.mark.usefixtures("keep_global_random_state")
@pytest.mark.parametrize(
    ("case", "check"),
    [
        ("another key", "signature"),
        ("a file changed", "hashes"),
        ("another teacher", "teacher"),
        ("another manifest of the teacher", "teacher"),
        ("expired", "expiry"),
        ("refused by its gate", "gate"),
        ("NaN weights", "finite"),
        ("a weight missing", "shapes"),
    ],
)
def test_tampered_students_are_refused(signed, tmp_path, case, check):
    bundle, teacher, registry, key = signed
    other = load_private_key(generate_keypair(tmp_path / "other").private_path)
    tampered = {
        "another key": lambda: resign(bundle, other),
        "a file changed": lambda: StudentBundle(
            bundle.manifest_bytes, bundle.signature, {**bundle.files, "config.json": b"{}"}
        ),
        "another teacher": lambda: resign(bundle, key, teacher_version=bundle.teacher_version + 1),
        "another manifest of the teacher": lambda: resign(bundle, key, teacher_manifest_sha256="0" * 64),
        "expired": lambda: resign(bundle, key, expires_at=(NOW - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")),
        "refused by its gate": lambda: resign(bundle, key, gate={**bundle.manifest["gate"], "decision": "refused"}),
        "NaN weights": lambda: resign(bundle, key, files=weights_changed(bundle, nan_weight)),
        "a weight missing": lambda: resign(bundle, key, files=weights_changed(bundle, drop_weight)),
    }[case]()
    verify_student(bundle, key.public_key(), teacher_manifest_bytes=teacher, now=NOW)  # the original passes
    with pytest.raises(VerificationError) as err:
        verify_student(tampered, key.public_key(), teacher_manifest_bytes=teacher, now=NOW)
        load_student(tampered)
    assert err.value.check == check


def test_a_site_refuses_a_student_it_did_not_choose_or_of_another_version(federation, signed, tmp_path):
    root, _ = federation
    bundle, _, _, key = signed
    sites = FederationSites(root / "sites")
    full, chose = sites_config(sites, 0), sites_config(sites, 1)
    with pytest.raises(VerificationError, match="installs full versions"):
        receive_student(full, bundle)
    with pytest.raises(VerificationError, match="this site runs version"):
        receive_student(chose, resign(bundle, key, teacher_version=bundle.teacher_version + 1))
    # The same student again: nothing to do.
    assert receive_student(chose, bundle)["already-installed"] == 1


def test_the_registry_keeps_one_student_a_version(signed):
    bundle, _, registry, key = signed
    with pytest.raises(RegistryError, match="has a student already"):
        registry.publish_student(
            bundle.teacher_version,
            bundle.files,
            signing_key=key,
            architecture=bundle.manifest["architecture"],
            gate=bundle.manifest["gate"],
            distill={},
        )


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
def test_a_student_worse_than_its_tolerance_is_not_stored(tmp_path, caplog):
    # Prepare: the embedded model's demo-sized validation text; a learning rate that wrecks the student
    from test_install import publish

    from fedretrain.modeling.lora_model import load_lora_model
    from server.cycle.distill import distill_version
    from server.cycle.publish import RegistryHandle
    from simulation.notes import validation_notes

    cfg = compose_config(["experiment=smoke", "distill.steps=3", "distill.lr=5", "distill.tolerance=0"])
    cfg = dataclasses.replace(cfg, gate=dataclasses.replace(cfg.gate, bootstrap_samples=200))
    from fedretrain.config import Job

    key = load_private_key(generate_keypair(tmp_path / "keys").private_path)
    registry = Registry(tmp_path / "registry")
    version = publish(registry, key, Job.from_config(cfg, run_id="d"), tmp_path / "adapter", 0.01)
    lm = load_lora_model(cfg.model, cfg.lora, seed=0, device="cpu")
    texts = [r["text"] for r in validation_notes(24, 0)]

    # Execute
    with caplog.at_level(logging.INFO, logger="fedretrain"):
        figures, stored = distill_version(RegistryHandle(registry, key, 30), cfg, lm, version, texts)

    # Assert: refused with its figures and the reason; nothing stored
    assert figures["decision"] == "refused" and figures["gap"] > 0
    assert "above the tolerance 0.0" in figures["reasons"][0]
    assert registry.student(version) is None and stored is None and "refused" in caplog.text


def test_registry_verify_checks_every_student(signed, tmp_path):
    import shutil

    _, _, registry, key = signed
    assert registry.check(key.public_key()).ok
    copy = Registry(tmp_path / "copy")
    shutil.copytree(registry.root, copy.root)
    (copy.root / "students" / "000001" / "config.json").write_text("{}")
    problems = copy.check(key.public_key()).problems
    assert any(p.startswith("student 000001: hashes:") for p in problems), problems


@pytest.mark.usefixtures("cli_logging")
def test_registry_show_lists_the_versions_student(signed, capsys):
    from cli.main import main

    _, _, registry, _ = signed
    assert main(["registry", "show", "1", "--root", str(registry.root)]) == 0
    out = capsys.readouterr().out
    assert "student (students/000001/):" in out and '"layers": 1' in out


@pytest.mark.usefixtures("keep_global_random_state")
def test_a_model_without_decoder_layers_to_drop_is_refused_by_name():
    class Flat(torch.nn.Module):
        config = transformers.PretrainedConfig(num_hidden_layers=2)

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="expected one ModuleList of 2 decoder layers"):
        build_student(Flat(), None)


@pytest.mark.usefixtures("instruction_identity", "keep_global_random_state")
def test_a_failed_distillation_leaves_the_version_published_and_delivered(tmp_path, caplog):
    # A one-layer model has no smaller student.
    from test_model_families import save_family

    from fedretrain.modeling.loading import load_tokenizer

    model_dir = save_family("llama", tmp_path / "model", load_tokenizer("embedded"))
    with caplog.at_level(logging.ERROR, logger="fedretrain"):
        summary = one_round(model_dir, tmp_path, ["distill.enabled=true", "simulation.student_sites=[site-01]"])
    assert summary["published_version"] == 1 and set(summary["publication"]["installed"]) == {"site-00", "site-01"}
    assert summary["student"]["decision"] == "refused" and "1 to 0 layers" in summary["student"]["reasons"][0]
    assert summary["publication"]["students"]["waiting"] == ["site-01"]
    assert "distillation failed, no student" in caplog.text


def test_the_dashboards_version_shows_its_student(signed):
    from server.dashboard.catalogue import RegistryDir
    from server.dashboard.pages import _student_cell
    from server.dashboard.versions import version_detail

    _, _, registry, _ = signed
    detail = version_detail(RegistryDir("r", registry.root), 1)
    assert detail is not None and not detail["problems"]
    assert detail["student"]["architecture"]["layers"] == 1
    assert _student_cell(detail["student"]).startswith("1 of 2 layers, ")


def test_a_student_damaged_at_rest_is_not_sent_and_the_coordinator_goes_on(signed, tmp_path, caplog):
    import shutil

    from server.cycle.publish import RegistryHandle, student_for

    _, _, registry, key = signed
    copy = Registry(tmp_path / "copy")
    shutil.copytree(registry.root, copy.root)
    assert student_for(RegistryHandle(copy, key, 30), 1) is not None
    (copy.root / "students" / "000001" / "student.sig").unlink()
    with caplog.at_level(logging.ERROR, logger="fedretrain"):
        assert student_for(RegistryHandle(copy, key, 30), 1) is None
    assert "its stored student does not verify" in caplog.text


@pytest.mark.usefixtures("keep_global_random_state")
def test_a_student_site_repairs_a_damaged_student_and_answers_with_the_full_version_without_one(
    federation, signed, tmp_path
):
    import shutil

    from client.install.generate import load_installed
    from client.install.student import wants_student

    root, _ = federation
    bundle = signed[0]
    site = sites_config(FederationSites(root / "sites"), 1)
    # A copy of the student site's state, to damage.
    state = tmp_path / "state"
    shutil.copytree(site.state_path, state)
    site = dataclasses.replace(site, state_dir=str(state))
    store = model_store(site)
    assert not wants_student(site, store)
    folder = student_dir(store, 1)
    (folder / "config.json").write_text("{}")
    assert wants_student(site, store)  # damaged at rest: asked for again ...
    assert receive_student(site, bundle)["already-installed"] == 0  # ... and replaced by the verified one
    assert not wants_student(site, store)
    # A version that came without a student: the full version answers, and says so.
    shutil.rmtree(folder)
    installed = load_installed(
        Path(site.model_store_path), coordinator_key=Path(str(site.coordinator_key)), variant="student"
    )
    assert not installed.student and "no student of version 1" in str(installed.fallback)
