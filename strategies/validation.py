"""Every train reply is checked before it can reach the average.

Flower's aggregators trust what a client says: ``num-examples=1e9`` takes over
FedAvg (so ours never reads a count from a site), NaN passes straight through, a missing key crashes the round
(research/reliability.md §3-4). This module turns one reply Message into either
an :class:`AcceptedReply` of plain data or a :class:`ReplyRejected` with a reason
an operator can act on.

Train reply contract (what ``client/`` sends):

- ``"arrays"``: ArrayRecord of the LoRA tensors described by the AdapterSpec;
- ``"metrics"``: MetricRecord with the :data:`TRAIN_METRICS` keys (``epsilon`` is
  -1.0 for non-private training). A site sends no record count: its averaging weight
  is the coordinator's to set, not the site's to claim;
- ``"site"``: ConfigRecord with ``"site-id"`` (str, pseudonymous) and, echoed from
  the instruction, ``"server-round"`` (int) and ``"global-hash"`` (str): the round and
  the digest of the global adapter the site trained on. A reply that echoes another
  round or another model is stale or replayed and is refused.

The arrays are sized before they are parsed: a reply larger than the adapter plus
:data:`REPLY_SIZE_MARGIN` is refused without being loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedretrain.arrays import AdapterSpec, check_adapter, from_array_record, record_nbytes
from fedretrain.errors import AdapterMismatchError, ReplyRejected

# Nothing in a train reply depends on the site's records: no count, no training loss.
# Epsilon and sigma follow from the job's fixed sampling rate and the site's ledger.
TRAIN_METRICS = (
    "epsilon",
    "epsilon-ceiling",
    "delta",
    "noise-multiplier",
    "sample-rate",
    "steps",
)

# Optional: the LoRA rank a site trained (fedretrain/lora_ranks.py); absent, the adapter's own.
RANK_METRIC = "lora-rank"

# Noised sums of each held-out record's clipped loss change, and each noise's std
# (client/round/site.py, fedretrain/privacy/release.py).
EVALUATE_METRICS = (
    "num-examples",
    "diff-sum",
    "diff-sumsq",
    "num-examples-std",
    "diff-sum-std",
    "diff-sumsq-std",
    "eval-clip",
)

Metrics = dict[str, int | float]

# A reply may exceed the adapter's raw bytes by this share, plus a fixed allowance per
# tensor for its .npy header (Flower's own is ~128 bytes): anything larger is not an
# adapter of this spec and is refused before a byte of it is parsed.
REPLY_SIZE_MARGIN = 0.10
NPY_HEADER_ALLOWANCE = 256


@dataclass(frozen=True)
class RoundTag:
    """What a reply must echo: the round it answers and the global adapter's digest."""

    server_round: int
    global_hash: str


def max_reply_bytes(spec: AdapterSpec) -> int:
    """The largest ArrayRecord payload accepted for ``spec``."""
    return int(spec.nbytes * (1 + REPLY_SIZE_MARGIN)) + NPY_HEADER_ALLOWANCE * len(spec.entries)


def check_reply_size(record: ArrayRecord, spec: AdapterSpec) -> None:
    """ReplyRejected if ``record`` is larger than :func:`max_reply_bytes` (nothing is parsed)."""
    size, limit = record_nbytes(record), max_reply_bytes(spec)
    if size > limit:
        raise ReplyRejected(
            f"reply arrays are {size} bytes, over the {limit} an adapter of "
            f"{spec.nbytes} bytes may take: refused before loading"
        )


def check_round_tag(msg: Message, expected: RoundTag | None) -> None:
    """ReplyRejected unless the reply echoes ``expected`` (None: nothing to compare)."""
    if expected is None:
        return
    site = record_of(msg, "site", ConfigRecord)
    got_round, got_hash = site.get("server-round"), site.get("global-hash")
    if got_round != expected.server_round or got_hash != expected.global_hash:
        raise ReplyRejected(
            f"stale or replayed reply: it answers round {got_round!r} (global {str(got_hash)[:12]}), "
            f"this is round {expected.server_round} (global {expected.global_hash[:12]})"
        )


RecordT = TypeVar("RecordT", ArrayRecord, MetricRecord, ConfigRecord)


@dataclass(frozen=True)
class AcceptedReply:
    """A train reply that passed every check.

    Attributes
    ----------
    node_id : int
        Flower node that sent it.
    site_id : str
        The site's pseudonymous id.
    arrays : dict[str, np.ndarray]
        Adapter tensors, read-only views into the message.
    metrics : dict[str, int | float]
        All scalar metrics of the reply.
    message : Message | None
        The reply itself (its ``"arrays"`` record is what ``arrays`` views).
    """

    node_id: int
    site_id: str
    arrays: dict[str, np.ndarray]
    metrics: Metrics
    message: Message | None = field(default=None, repr=False, compare=False)


def site_id_of(msg: Message) -> str | None:
    """The reply's site id if it carries a string one, else None (for logs)."""
    if not msg.has_content():
        return None
    site = msg.content.config_records.get("site")
    value = site.get("site-id") if site is not None else None
    return value if isinstance(value, str) and value else None


# A client's error reason may be a whole traceback; logs keep the start of it.
_MAX_REASON_CHARS = 300


def error_reason(msg: Message) -> str:
    """Describe an error reply (code and the client's reason, quoted and shortened)."""
    reason = msg.error.reason or ""
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[:_MAX_REASON_CHARS] + "..."
    return f"error reply (code {msg.error.code}): {reason!r}"


def record_of(msg: Message, key: str, kind: type[RecordT]) -> RecordT:
    """``msg.content[key]`` if it is a ``kind`` record, else ReplyRejected."""
    if msg.has_error():
        raise ReplyRejected(error_reason(msg))
    if not msg.has_content():
        raise ReplyRejected("reply has neither content nor error")
    record = msg.content.get(key)
    if not isinstance(record, kind):
        raise ReplyRejected(f"missing {kind.__name__} '{key}'")
    return record


def scalar_metrics(record: MetricRecord, required: tuple[str, ...]) -> Metrics:
    """Required keys present; every value a finite scalar (lists are refused)."""
    missing = [key for key in required if key not in record]
    if missing:
        raise ReplyRejected(f"metrics missing {missing}")
    metrics: Metrics = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ReplyRejected(f"metric '{key}' is not a scalar: {value!r}")
        if not math.isfinite(value):
            raise ReplyRejected(f"metric '{key}' is not finite: {value!r}")
        metrics[key] = value
    return metrics


def _checked_site_id(msg: Message) -> str:
    site_id = record_of(msg, "site", ConfigRecord).get("site-id")
    if not isinstance(site_id, str) or not site_id:
        raise ReplyRejected(f"site-id must be a non-empty string, got {site_id!r}")
    return site_id


def validate_train_reply(
    msg: Message,
    spec: AdapterSpec,
    *,
    max_abs_value: float | None = None,
    expected: RoundTag | None = None,
) -> AcceptedReply:
    """Check one train reply against the contract and the adapter spec.

    Cheap metadata checks run first, so a bad reply costs no array parsing.

    Parameters
    ----------
    msg : Message
        A reply returned by ``grid.send_and_receive``.
    spec : AdapterSpec
        The adapter every site must send back.
    max_abs_value : float | None
        Largest magnitude any adapter value may have (``check_adapter``'s ``max_abs``),
        or None for no bound.
    expected : RoundTag | None
        The round and global digest the reply must echo; None: not checked.

    Returns
    -------
    AcceptedReply

    Raises
    ------
    ReplyRejected
        With the reason: an error reply, an oversized one, a stale or replayed one,
        a missing record, a bad site id, a bad metric, or an adapter that does
        not match ``spec``.
    """
    return _checked_reply(msg, "arrays", spec, max_abs_value, expected, "")


def _checked_reply(
    msg: Message, key: str, spec: AdapterSpec, max_abs: float | None, expected: RoundTag | None, what: str
) -> AcceptedReply:
    """The checks every train reply gets, cheap ones first: ``msg[key]`` sized, round, metrics,
    site id, then the arrays against ``spec`` (``what`` prefixes an array's rejection)."""
    record = record_of(msg, key, ArrayRecord)
    check_reply_size(record, spec)
    check_round_tag(msg, expected)
    metrics = scalar_metrics(record_of(msg, "metrics", MetricRecord), TRAIN_METRICS)
    site_id = _checked_site_id(msg)
    try:
        arrays = from_array_record(record)
        check_adapter(arrays, spec, max_abs=max_abs)
    except AdapterMismatchError as err:
        raise ReplyRejected(f"{what}{err}") from err
    return AcceptedReply(node_id=msg.metadata.src_node_id, site_id=site_id, arrays=arrays, metrics=metrics, message=msg)


@dataclass(frozen=True)
class SiteEvaluation:
    """One site's accepted evaluate reply: noised sums over its held-out records of
    (candidate loss - baseline loss). The strategy records it, the gate decides on it.

    Attributes
    ----------
    site_id : str
        The site the runtime bound the reply's node to.
    examples, diff_sum, diff_sumsq : float
        The noised count, sum and sum of squares of each record's clipped loss change.
    sum_std : float
        The standard deviation of the noise on ``diff_sum``.
    node_id : int
        Flower node that sent it (0: built by hand).
    metrics : dict[str, int | float]
        Every scalar metric of the reply, for the run's log.
    """

    site_id: str
    examples: float
    diff_sum: float
    diff_sumsq: float
    sum_std: float
    node_id: int = 0
    metrics: Metrics = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, site_id: str, node_id: int, metrics: Metrics) -> SiteEvaluation:
        """Build one from a reply's checked metrics (or a round log's copy of them)."""
        return cls(
            site_id=site_id,
            examples=float(metrics["num-examples"]),
            diff_sum=float(metrics["diff-sum"]),
            diff_sumsq=float(metrics["diff-sumsq"]),
            sum_std=float(metrics["diff-sum-std"]),
            node_id=int(node_id),
            metrics=dict(metrics),
        )

    @property
    def change(self) -> float:
        """Mean loss change per record (negative: the candidate is better)."""
        return self.diff_sum / max(self.examples, 1.0)

    @property
    def change_std(self) -> float:
        """Standard deviation of the noise on :attr:`change`."""
        return self.sum_std / max(self.examples, 1.0)

    @property
    def epsilon(self) -> float | None:
        """The site's epsilon after this evaluation's charge, when it reported one."""
        value = self.metrics.get("epsilon")
        return None if value is None else float(value)


def validate_evaluate_reply(msg: Message, expected: RoundTag | None = None) -> SiteEvaluation:
    """Check one evaluate reply: a ``"metrics"`` MetricRecord with the
    :data:`EVALUATE_METRICS` keys (finite; every ``*-std`` and ``eval-clip`` > 0) and a
    ``"site"`` ConfigRecord with ``"site-id"``.

    The sums are noised at the site, so a noised count may be small or negative and a
    noised sum of squares below its bound: nothing is inferred from their consistency.

    Raises
    ------
    ReplyRejected
        With the reason.
    """
    metrics = scalar_metrics(record_of(msg, "metrics", MetricRecord), EVALUATE_METRICS)
    check_round_tag(msg, expected)
    return checked_evaluation(_checked_site_id(msg), msg.metadata.src_node_id, metrics)


def checked_evaluation(site_id: str, node_id: int, metrics: Metrics) -> SiteEvaluation:
    """:class:`SiteEvaluation` from :func:`scalar_metrics`'s output, once every noise std and the
    clip are > 0 (ReplyRejected otherwise). A canary's report is checked by it too."""
    for key in ("num-examples-std", "diff-sum-std", "diff-sumsq-std", "eval-clip"):
        if not metrics[key] > 0:
            raise ReplyRejected(f"{key} must be > 0, got {metrics[key]!r}")
    return SiteEvaluation.from_metrics(site_id, node_id, metrics)


def masked_spec(spec: AdapterSpec) -> AdapterSpec:
    """The shape of a masked update under secure aggregation: the adapter's keys and shapes, in uint32."""
    return AdapterSpec(entries=tuple((key, shape, "uint32") for key, shape, _ in spec.entries))


def validate_masked_reply(
    msg: Message, spec: AdapterSpec, *, modulus: int, expected: RoundTag | None = None
) -> AcceptedReply:
    """Check one train reply of a secure-aggregation round: all of :func:`validate_train_reply` that
    a masked vector leaves to check.

    The reply carries ``"masked"`` (client/secagg.py) instead of ``"arrays"``: the site's
    update, quantised and masked, one uint32 tensor per adapter tensor, each value below
    ``modulus``. Its values say nothing until the masks are removed from the sum, so
    neither finiteness nor magnitude nor distance can be checked per site; identity,
    round, metrics, size, keys, shapes and dtype can.

    Raises
    ------
    ReplyRejected
        With the reason.
    """
    reply = _checked_reply(msg, "masked", masked_spec(spec), None, expected, "masked update: ")
    beyond = [key for key, array in reply.arrays.items() if array.size and int(array.max()) >= modulus]
    if beyond:
        raise ReplyRejected(f"masked update: tensor '{beyond[0]}' holds values at or above the modulus {modulus}")
    return reply
