"""The coordinator distils each version it publishes into a smaller student (``distill.enabled``).

After a version is written to the registry, its teacher (base model + the version's adapter,
verified again from the registry) teaches a student with fewer decoder layers
(fedretrain/training/distill.py) on the coordinator's own validation text of the cycle: no
site's data, no privacy spent. A share ``distill.held_out`` of those records (chosen by a hash
of the text) is kept out of the distillation to gate the student: its token-weighted loss there
minus the teacher's, with a 95% paired bootstrap interval over the records; the student is
signed and stored beside its teacher (``students/<version>/``, fedretrain/registry/student.py)
only when the upper end of that interval is at most ``distill.tolerance`` nats. Otherwise the
cycle records why and the version goes out without a student.

The sites that chose a student (node_config ``model-variant='student'``) receive it after its
teacher (server/cycle/publish.py ``deliver``) and verify it before they install it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from fedretrain.arrays import from_torch_state_dict
from fedretrain.config import Config
from fedretrain.data.encoding import encode_texts
from fedretrain.errors import RegistryError
from fedretrain.modeling.lora_model import LoraModel, load_adapter_arrays
from fedretrain.registry.bundle import verify_bundle
from fedretrain.registry.manifest import utc_now
from fedretrain.registry.student import PASSED, STUDENT_FILES, StudentBundle
from fedretrain.training.distill import (
    build_student,
    distill,
    merged_teacher,
    parameter_count,
    pick_held_out,
    tokens_per_second,
)
from fedretrain.training.evaluate import evaluate_loss
from server.cycle.gate import paired_bootstrap
from server.cycle.publish import RegistryHandle

log = logging.getLogger("fedretrain.server")

REFUSED = "refused"


def distill_version(
    handle: RegistryHandle, cfg: Config, lm: LoraModel, version: int, texts: Sequence[str]
) -> tuple[dict[str, Any], StudentBundle | None]:
    """Distil ``version`` into a student, gate it against its teacher, store it if it passed.

    ``lm`` is the cycle's model (its adapter is set to the version's); ``texts`` the cycle's
    validation texts. Returns the figures the cycle's summary records (``decision`` passed or
    refused, with ``reasons``) and the student as stored (None when refused).
    """
    policy = cfg.distill
    started = time.perf_counter()
    registry, public_key = handle.registry, handle.signing_key.public_key()
    bundle = registry.bundle(version)
    tensors = verify_bundle(bundle, public_key, now=utc_now())
    load_adapter_arrays(lm, from_torch_state_dict(tensors))
    held = pick_held_out(texts, policy.held_out)
    train_texts = [t for t, h in zip(texts, held, strict=True) if not h]
    gate_texts = [t for t, h in zip(texts, held, strict=True) if h]
    if len(gate_texts) < 2 or not train_texts:
        reason = (
            f"{len(texts)} validation records leave {len(train_texts)} to distil on and {len(gate_texts)} "
            f"to gate with (distill.held_out={policy.held_out}); a student needs at least 1 and 2"
        )
        log.warning("version %d: no student: %s", version, reason)
        return {"version": version, "decision": REFUSED, "reasons": [reason]}, None
    train = encode_texts(lm.tokenizer, train_texts, cfg.model.max_length)
    gate_set = encode_texts(lm.tokenizer, gate_texts, cfg.model.max_length)
    teacher = merged_teacher(lm.model)
    device = next(teacher.parameters()).device
    student, keep = build_student(teacher, policy.layers)
    student.to(device)
    losses = distill(
        teacher,
        student,
        train,
        steps=policy.steps,
        batch_size=policy.batch_size,
        lr=policy.lr,
        temperature=policy.temperature,
        alpha=policy.alpha,
        seed=cfg.seed,
    )
    batch = cfg.train.eval_batch_size
    teacher_stats = evaluate_loss(teacher, gate_set, batch_size=batch)  # type: ignore[arg-type]
    student_stats = evaluate_loss(student, gate_set, batch_size=batch)  # type: ignore[arg-type]
    # paired_bootstrap's interval is of teacher - student; the gap is its negative.
    low, high = paired_bootstrap(teacher_stats, student_stats, 0.95, cfg.gate.bootstrap_samples, seed=cfg.seed)
    gap_low, gap_high = -high, -low
    gap = student_stats.loss - teacher_stats.loss
    speed = tokens_per_second({"teacher": teacher, "student": student}, gate_set, batch_size=batch, reps=3)
    passed = gap_high <= policy.tolerance
    gate = {
        "decision": PASSED if passed else REFUSED,
        "teacher_loss": round(teacher_stats.loss, 6),
        "student_loss": round(student_stats.loss, 6),
        "gap": round(gap, 6),
        "ci_low": round(gap_low, 6),
        "ci_high": round(gap_high, 6),
        "confidence": 0.95,
        "tolerance": policy.tolerance,
        "examples": student_stats.examples,
    }
    config: Any = teacher.config
    architecture: dict[str, Any] = {
        "model_type": str(config.model_type),
        "layers": len(keep),
        "teacher_layers": int(config.num_hidden_layers),
        "parameters": parameter_count(student),
        "teacher_parameters": parameter_count(teacher),
    }
    settings = {
        "steps": policy.steps,
        "batch_size": policy.batch_size,
        "lr": policy.lr,
        "temperature": policy.temperature,
        "alpha": policy.alpha,
        "train_records": len(train_texts),
        "from_teacher_layers": list(keep),
        "final_loss": round(losses[-1], 6),
    }
    figures: dict[str, Any] = {
        "version": version,
        **gate,
        "architecture": architecture,
        "size_share": round(architecture["parameters"] / architecture["teacher_parameters"], 4),
        "tokens_per_s": {k: round(v, 1) for k, v in speed.items()},
        "speedup": round(speed["student"] / speed["teacher"], 3),
        "distill": settings,
    }
    stored = None
    if passed:
        with tempfile.TemporaryDirectory(prefix="fedretrain-student-") as tmp:
            cast(Any, student).save_pretrained(tmp, safe_serialization=True)
            files = {name: Path(tmp, name).read_bytes() for name in STUDENT_FILES}
        try:
            stored = registry.publish_student(
                version, files, signing_key=handle.signing_key, architecture=architecture, gate=gate, distill=settings
            )
        except RegistryError as err:
            figures.update(decision=REFUSED, reasons=[str(err)])
            log.warning("version %d: the student was not stored: %s", version, err)
        else:
            figures["bytes"] = stored.nbytes
    else:
        figures["reasons"] = [
            f"the student's held-out loss is {gap:+.4f} nats from its teacher's (95% interval "
            f"[{gap_low:+.4f}, {gap_high:+.4f}]), above the tolerance {policy.tolerance}"
        ]
    figures["seconds"] = round(time.perf_counter() - started, 3)
    log.info(
        "version %d: student of %d of %d layers (%d of %d parameters): held-out loss %.4f vs teacher %.4f "
        "(gap %+.4f, 95%% CI [%+.4f, %+.4f], tolerance %.2f): %s; %.1fx the teacher's tokens/s (%.1f s)",
        version,
        architecture["layers"],
        architecture["teacher_layers"],
        architecture["parameters"],
        architecture["teacher_parameters"],
        student_stats.loss,
        teacher_stats.loss,
        gap,
        gap_low,
        gap_high,
        policy.tolerance,
        figures["decision"],
        figures["speedup"],
        figures["seconds"],
    )
    return figures, stored
