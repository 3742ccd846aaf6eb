"""What publishing costs: signing a version at the coordinator and verifying it at a site.

On the default model's adapter (the embedded model, LoRA r=8 on q_proj and v_proj),
best of N, in one process:

(a) ``sign``: Ed25519 over the canonical manifest, the signing step alone;
(b) ``publish``: ``Registry.publish`` whole (read the adapter files, hash, sign,
    verify, staging directory, fsync, rename, champion pointer);
(c) ``verify``: ``verify_bundle`` whole, as a site runs it (signature, hashes,
    expiry, base model, safetensors load, keys and shapes, finite values);
(d) ``sha256``: hashing the bundle's bytes once, the floor under (b) and (c).

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_publish.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from timing import best_of

from fedretrain.config.schema import LoraSettings, ModelConfig
from fedretrain.modeling.loading import resolve_model_path
from fedretrain.modeling.lora_model import load_lora_model
from fedretrain.registry.base_model import base_model_identity
from fedretrain.registry.bundle import verify_bundle
from fedretrain.registry.signing import canonical_json, sign
from fedretrain.registry.store import Registry


def measure(reps: int) -> list[dict]:
    lora = LoraSettings()
    lm = load_lora_model(ModelConfig(max_length=256), lora, seed=0, device="cpu")
    key = Ed25519PrivateKey.generate()
    identity = base_model_identity("embedded", Path(resolve_model_path("embedded")))
    lora_fields = lora.to_manifest(lm.target_modules)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        lm.model.save_pretrained(str(adapter))
        registry = Registry(Path(tmp) / "registry")

        def publish() -> int:
            return registry.publish(
                adapter,
                signing_key=key,
                base_model=identity,
                lora=lora_fields,
                run={"name": "bench"},
                sites={},
                gate={"decision": "publish"},
                expiry_days=30,
            )

        t_publish = best_of(publish, reps)
        bundle = registry.bundle(registry.champion())
        shapes = {name: shape for name, shape, _ in lm.spec.entries}
        now = datetime.now(UTC)
        t_verify = best_of(
            lambda: verify_bundle(
                bundle, key.public_key(), now=now, base_model_sha256=identity["sha256"], expected_shapes=shapes
            ),
            reps,
        )
        payload = canonical_json(bundle.manifest)
        t_sign = best_of(lambda: sign(key, payload), reps * 10)
        blob = b"".join(bundle.files.values()) + bundle.manifest_bytes
        t_hash = best_of(lambda: hashlib.sha256(blob).digest(), reps * 10)
    nbytes = len(blob)
    return [
        {"name": "sign manifest (ms)", "value": t_sign * 1e3, "limit_or_peer": None, "ratio": None},
        {
            "name": "publish version (ms)",
            "value": t_publish * 1e3,
            "limit_or_peer": t_hash * 1e3,
            "ratio": t_publish / t_hash,
        },
        {
            "name": "verify version at a site (ms)",
            "value": t_verify * 1e3,
            "limit_or_peer": t_hash * 1e3,
            "ratio": t_verify / t_hash,
        },
        {
            "name": f"sha256 of the {nbytes} bundle bytes (ms)",
            "value": t_hash * 1e3,
            "limit_or_peer": None,
            "ratio": None,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = measure(reps=3 if args.quick else 20)
    for row in rows:
        ratio = "" if row["ratio"] is None else f"  ({row['ratio']:.1f}x sha256 of the bytes)"
        print(f"{row['name']:48s}{row['value']:10.3f}{ratio}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
