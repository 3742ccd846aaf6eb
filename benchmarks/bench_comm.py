"""Bytes on the wire per client per round: the adapter against the full model.

On the default model and LoRA config (the embedded tiny Llama, r=8 on q_proj/v_proj):

(a) the fp32 adapter as the project ships it (``to_array_record``, Flower's
    ``ArrayRecord.count_bytes``), down and up, against the same for the full
    model's parameters: what federating full fine-tuning would ship;
(b) what-if, measured but not on the wire: the adapter in bfloat16. Its bytes and
    the relative L2 error of the weights after a round of local training (the
    trained adapter, lora_B no longer zero), bf16 -> fp32 against fp32.

Run from the repository root (not with ``-m``: opacus installs a ``benchmarks`` package)::

    python benchmarks/bench_comm.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from bench_dp_overhead import note_batches

from fedretrain.arrays import to_array_record
from fedretrain.config import compose_config
from fedretrain.modeling.lora_model import adapter_arrays, load_lora_model
from fedretrain.training.dp import DPParams, train_lora
from fedretrain.training.params import TrainParams


def trained_adapter(steps: int) -> tuple[dict[str, np.ndarray], int]:
    """The default model's adapter after ``steps`` non-private steps; and the full model's bytes."""
    cfg = compose_config([])
    lm = load_lora_model(cfg.model, cfg.lora, seed=cfg.seed, device="cpu")
    data = note_batches(lm, cfg, cfg.train.batch_size, 4)
    params = TrainParams(
        local_steps=steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr, optimizer=cfg.train.optimizer
    )
    dp = DPParams(
        enabled=False,
        noise_multiplier=0.0,
        max_grad_norm=cfg.privacy.max_grad_norm,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    train_lora(lm.model, data, params, dp, seed=cfg.seed)
    # The full model's parameter bytes (tied weights once); its record framing (a
    # ~130-byte .npy header per tensor) is left out, which only flatters the full model.
    return adapter_arrays(lm.model), lm.base_nbytes


def bf16_what_if(arrays: dict[str, np.ndarray]) -> tuple[int, float]:
    """Bytes of the adapter as a bf16 ArrayRecord payload, and the relative L2 error."""
    flat = torch.cat([torch.from_numpy(a).reshape(-1) for a in arrays.values()])
    back = flat.to(torch.bfloat16).to(torch.float32)
    error = float(torch.linalg.vector_norm(back - flat) / torch.linalg.vector_norm(flat))
    # Same record framing as fp32 (one .npy header per tensor), half the payload.
    headers = to_array_record(arrays).count_bytes() - flat.numel() * 4
    return headers + flat.numel() * 2, error


def measure(steps: int) -> list[dict[str, object]]:
    """The communication rows; see the module docstring."""
    arrays, full_bytes = trained_adapter(steps)
    fp32 = to_array_record(arrays).count_bytes()
    bf16, error = bf16_what_if(arrays)
    per_round, full_round = 2 * fp32, 2 * full_bytes  # down (global adapter) + up (site's adapter)
    return [
        {
            "name": "comm_bytes_per_client_round",
            "value": float(per_round),
            "limit_or_peer": float(full_round),
            "ratio": per_round / full_round,
            "unit": "bytes",
            "note": "fp32 adapter down + up vs the full model's parameters down + up",
        },
        {
            "name": "comm_bf16_bytes_what_if",
            "value": float(bf16),
            "limit_or_peer": float(fp32),
            "ratio": bf16 / fp32,
            "unit": "bytes",
            "note": "not on the wire: adapter as bf16 vs fp32 today",
        },
        {
            "name": "comm_bf16_rel_l2_error",
            "value": error,
            "limit_or_peer": 2.0**-8,
            "ratio": error / 2.0**-8,
            "unit": "relative L2",
            "note": "bf16 round trip of the trained adapter vs bf16's unit roundoff 2^-8",
        },
    ]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, print, optionally write JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="local training steps before measuring")
    parser.add_argument("--json", type=Path, help="write result rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(args.steps)
    for row in rows:
        print(f"{row['name']:32s}{row['value']:14.6g}  vs {row['limit_or_peer']:14.6g}  ratio {row['ratio']:.4g}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
