"""The embedded default base model: a tiny Llama pretrained here, on first use.

fedretrain must run with no hub access, so its default model is built from the
bundled general corpus (``fedretrain/assets/general_corpus.md``): a byte-level
BPE tokenizer, then a small ``LlamaForCausalLM`` pretrained for a fixed number
of steps on CPU. The build is deterministic (seeded init, fixed data order,
deterministic kernels, fixed thread count) and takes well under a minute on
two cores. The result is an ordinary ``save_pretrained`` directory, so it is
loaded through the same ``from_pretrained`` path as any other model.

The directory is cached under ``default_cache_dir()`` with a name that hashes
the recipe and the corpus, so changing either builds a new model. Concurrent
callers (several Ray actors) serialise on a lock file, and the model is built
in a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from fedretrain.atomic import atomic_write_json
from fedretrain.errors import ModelLoadError

logger = logging.getLogger("fedretrain")

EMBEDDED_NAME = "embedded"
RECIPE_FILE = "fedretrain_recipe.json"
WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order


@dataclass(frozen=True)
class Recipe:
    """Every setting that shapes the embedded model; part of its cache key."""

    format_version: int = 1
    seed: int = 0
    vocab_size: int = 2048  # BPE target; the tokenizer may stop short if the corpus runs out of merges
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    block_size: int = 128
    batch_size: int = 16
    steps: int = 200
    peak_lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    num_threads: int = 1  # float sums depend on the thread split; one thread is the same everywhere


RECIPE = Recipe()


def default_cache_dir() -> Path:
    """``$FEDRETRAIN_CACHE`` if set, else ``~/.cache/fedretrain``."""
    env = os.environ.get("FEDRETRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedretrain"


def corpus_text() -> str:
    """The bundled general corpus (documents separated by blank lines).

    It is plain text kept as ``.md``: a Flower app bundle (FAB) carries only ``.py``,
    ``.toml``, ``.md``, ``.yaml``, ``.json`` and ``.jsonl`` files, and a deployed
    ServerApp or ClientApp runs from the bundle, so it needs the corpus to find (or
    build) the same embedded model as every other process.
    """
    try:
        return resources.files("fedretrain").joinpath("assets/general_corpus.md").read_text(encoding="utf-8")
    except OSError as err:
        raise ModelLoadError(
            f"the bundled corpus fedretrain/assets/general_corpus.md is missing ({err}); "
            "reinstall fedretrain or run `python -m simulation.notes --write-general-corpus`"
        ) from err


def embedded_model_dir(cache_dir: Path | None = None, recipe: Recipe = RECIPE) -> Path:
    """Return the embedded model's directory, building it on first use.

    Parameters
    ----------
    cache_dir : Path | None
        Where built models live; ``default_cache_dir()`` when None.
    recipe : Recipe
        The build's settings: fedretrain's ``RECIPE`` (another one, e.g. a few
        pretraining steps, is for tests of the build itself).

    Returns
    -------
    Path
        A complete ``save_pretrained`` directory (config, safetensors weights,
        tokenizer) plus ``fedretrain_recipe.json``. Safe to call from several
        processes at once: one builds, the others wait and reuse.

    Raises
    ------
    ModelLoadError
        The cache is not writable, or a cached model's weights do not match
        the checksum recorded when it was built.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    text = corpus_text()
    corpus_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = _cache_key(recipe, corpus_sha)
    target = cache / f"{EMBEDDED_NAME}-{key}"
    if not (target / RECIPE_FILE).is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with _exclusive(cache / f".{EMBEDDED_NAME}-{key}.lock"):
                # Another process may have finished the build while we waited for the lock.
                if not (target / RECIPE_FILE).is_file():
                    _build_into_place(target, text, corpus_sha, recipe)
        except OSError as err:
            raise ModelLoadError(
                f"cannot build the embedded model in {cache} ({err}); set FEDRETRAIN_CACHE to a writable directory"
            ) from err
    _check_weights(target)
    return target


def _cache_key(recipe: Recipe, corpus_sha: str) -> str:
    blob = json.dumps({"recipe": asdict(recipe), "corpus_sha256": corpus_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crashed build never wedges the cache.
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_into_place(target: Path, text: str, corpus_sha: str, recipe: Recipe) -> None:
    # Called with the lock held: leftovers of a crashed build of this key are nobody's, so remove them.
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # no recipe file, so not ours to trust (e.g. a hand-copied partial directory)
        shutil.rmtree(target)
    logger.info("Building the embedded base model in %s (first use only; about 25 s on one CPU core)", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        recipe_record = _build(tmp, text, corpus_sha, recipe)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "Built the embedded base model in %.1f s (final pretraining loss %.3f)",
        recipe_record["build_seconds"],
        recipe_record["final_loss"],
    )


def _check_weights(directory: Path) -> None:
    # Hashing ~2.5 MB costs milliseconds and catches a truncated copy or a disk error early.
    try:
        expected = json.loads((directory / RECIPE_FILE).read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError):
        expected = None
    if expected is None or _sha256_file(directory / WEIGHTS_FILE) != expected:
        raise ModelLoadError(
            f"the cached embedded model in {directory} is corrupt (weights checksum mismatch); "
            "delete that directory and it will be rebuilt"
        )


def _sha256_file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def _build(directory: Path, text: str, corpus_sha: str, recipe: Recipe) -> dict:
    """Train tokenizer and model into ``directory``; return the recipe record written beside them."""
    # Imported here: the heavy libraries load only when a build actually happens.
    from fedretrain.modeling.pretrain import pretrain, train_tokenizer

    started = time.perf_counter()
    documents = [doc for doc in text.split("\n\n") if doc.strip()]
    tokenizer = train_tokenizer(documents, recipe.vocab_size, SPECIAL_TOKENS, recipe.max_position_embeddings)
    model, final_loss = pretrain(documents, tokenizer, recipe)
    with quiet_progress_bars():
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    record = {
        "recipe": asdict(recipe),
        "corpus_sha256": corpus_sha,
        "weights_sha256": _sha256_file(directory / WEIGHTS_FILE),
        "tokenizer_vocab_size": len(tokenizer),
        "final_loss": round(final_loss, 4),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(directory / RECIPE_FILE, record)
    return record


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars inside the block, then restore the caller's setting."""
    # A "Writing model shards 1/1" or "Loading weights" bar from every worker is noise in an operator's log.
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
