"""Which base model an adapter was trained on, as one hash a site can compare with its own.

A LoRA adapter only means something on top of the exact base weights it was
trained against. The identity hashes ``config.json`` and every ``*.safetensors`` /
``*.bin`` file at the top of the model directory (where transformers keeps
weights, sharded or not), in sorted name order, as
``sha256("name\\0<file sha256 hex>\\n" for each file)``: renaming a file changes it.
Tokenizer files are left out: they do not change what the adapter was fitted to.

A model loaded with ``model.init_missing_seed`` (parameters its checkpoint lacks,
initialised from that seed) is another model for every seed, so the seed is hashed
too, as a last line ``"init_missing_seed\0<seed>\n"``; without it the identity is as above.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from fedretrain.errors import RegistryError

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHUNK = 1 << 20

# (resolved path, size, mtime_ns) -> file sha256. A base model is gigabytes, and the
# coordinator asks for its identity at every publish; an edited file changes the key.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def base_model_identity(
    name: str, model_dir: str | os.PathLike[str], init_missing_seed: int | None = None
) -> dict[str, Any]:
    """Return ``{"name": name, "sha256": <identity of the weights in model_dir>}``.

    ``init_missing_seed`` is the config's ``model.init_missing_seed``: when set, part of the
    identity, and recorded beside it (``"init_missing_seed"``) so that whoever loads the
    version (``site generate``) builds the same model.

    Raises
    ------
    RegistryError
        If ``model_dir`` has no ``config.json`` or no weight file.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RegistryError(f"{model_dir} has no config.json: not a model directory")
    weights = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise RegistryError(f"{model_dir} has no *.safetensors or *.bin weight file")
    digest = hashlib.sha256()
    for rel in sorted(["config.json", *weights]):
        digest.update(f"{rel}\0{_file_sha256(model_dir / rel)}\n".encode())
    if init_missing_seed is None:
        return {"name": name, "sha256": digest.hexdigest()}
    digest.update(f"init_missing_seed\0{init_missing_seed}\n".encode())
    return {"name": name, "sha256": digest.hexdigest(), "init_missing_seed": init_missing_seed}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]
