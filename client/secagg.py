"""The site's side of secure aggregation: a Flower client mod around the train handler.

A coordinator that runs secure aggregation (``strategy.secure_aggregation``,
server/cycle/secagg.py) sends each site four train messages a round, in the stages of
Flower's SecAgg+: ``setup`` (the site makes two key pairs), ``share_keys`` (it splits its
private mask seed and first private key into Shamir shares, one per neighbour, each
encrypted to it), ``collect_masked_vectors`` (it trains as usual, then sends its update
masked, never the adapter) and ``unmask`` (it sends the shares the coordinator needs to
remove the masks of the sum: mask seeds of the sites that sent a vector, private keys
of those that dropped out, never both for one site). Stages 0, 1 and 3 are Flower's own
site-side functions (``flwr.client.mod.secure_aggregation.secaggplus_mod``); stage 2 is
here, because Flower's reads the legacy ``FitRes`` and masks with a 32-bit-seeded
generator (fedretrain/secagg.py says why and what replaces it).

A train message without the protocol's record is passed to the handler untouched: the
same ClientApp serves coordinators with and without secure aggregation.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedretrain.arrays import from_array_record, to_array_record
from fedretrain.errors import ERROR_CODES, ConfigError
from fedretrain.secagg import MAX_MODULUS, RECORD_KEY_CONFIGS, SECURE_STAGE, Key, Stage, mask, quantize_update

log = logging.getLogger("fedretrain.client")

# Flower's site side of SecAgg+ (the package exports its mod function under the module's name).
flower = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

# The reply's record holding the masked update (uint32, the adapter's keys and shapes).
MASKED_RECORD = "masked"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer a stage of secure aggregation; pass any other message to ``call_next``."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        if msg.metadata.message_type == MessageType.TRAIN and SECURE_STAGE in msg.content.config_records:
            del msg.content[SECURE_STAGE]  # only this mod says a message is inside the protocol
        return call_next(msg, ctxt)
    if RECORD_KEY_STATE not in ctxt.state.config_records:
        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
    state = flower.SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
    configs = ConfigRecord(dict(msg.content.config_records[RECORD_KEY_CONFIGS]))
    try:
        flower.check_stage(state.current_stage, configs)
        state.current_stage = cast(str, configs.pop(Key.STAGE))
        flower.check_configs(state.current_stage, configs)
    except (KeyError, TypeError, ValueError) as err:
        return _refuse(msg, f"secure aggregation: {err}")
    out = RecordDict()
    try:
        if state.current_stage == Stage.SETUP:
            _check_setup(configs)
            state.nid = msg.metadata.dst_node_id
            result = flower._setup(state, configs)  # noqa: SLF001 - Flower's stage 0, as its mod runs it
        elif state.current_stage == Stage.SHARE_KEYS:
            result = flower._share_keys(state, configs)  # noqa: SLF001 - Flower's stage 1
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
            # The neighbours' shares are checked before training: a bad one must not cost the budget.
            neighbours = _store_shares(state, configs)
            del msg.content[RECORD_KEY_CONFIGS]  # the handler gets the train message as without the protocol
            msg.content[SECURE_STAGE] = ConfigRecord({"stage": Stage.COLLECT_MASKED_VECTORS})
            reply = call_next(msg, ctxt)
            if reply.has_error():  # the site did not train (its data, its budget): it drops out
                ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
                return reply
            out = reply.content
            result = _masked_update(state, neighbours, msg, out)
        else:
            _check_unmask(state, configs)
            result = flower._unmask(state, configs)  # noqa: SLF001 - Flower's stage 3
    except Exception as err:  # noqa: BLE001 - any failure of the protocol is this site's refusal, never a crash
        return _refuse(msg, f"secure aggregation, stage {state.current_stage}: {type(err).__name__}: {err}")
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
    out.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(result, False)
    return Message(out, reply_to=msg)


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("%s", reason)
    return Message(Error(code=ERROR_CODES[ConfigError], reason=reason), reply_to=msg)


def _check_setup(configs: ConfigRecord) -> None:
    """Refuse settings under which the coordinator could unmask this site alone.

    Flower's site checks only their types. A threshold of 1 (one share: the secret itself),
    or one no larger than half the shares (two disjoint groups of holders could then give the
    coordinator both of this site's secrets, one each, by telling them different stories of
    who dropped out) would let a coordinator that breaks the protocol read this site's update.
    """
    # Flower's check_configs has checked these are ints.
    shares, threshold = cast(int, configs[Key.SHARE_NUMBER]), cast(int, configs[Key.THRESHOLD])
    if shares < 2 or not shares // 2 < threshold <= shares:
        raise ValueError(
            f"threshold {threshold} of {shares} shares: this site needs at least 2 shares and a threshold "
            "above half of them, or its secrets could be rebuilt without its neighbours' agreement"
        )
    modulus, levels = cast(int, configs[Key.MOD_RANGE]), cast(int, configs[Key.TARGET_RANGE])
    if modulus > MAX_MODULUS or modulus & (modulus - 1) or modulus <= levels:
        raise ValueError(f"modulus {modulus}: a power of two up to 2**32 above the {levels} quantisation levels")


def _check_unmask(state: Any, configs: ConfigRecord) -> None:
    """Refuse an unmask request that would reveal this site's own secret, or both secrets of one site."""
    active = set(cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST]))
    dead = set(cast(list[int], configs[Key.DEAD_NODE_ID_LIST]))
    if state.nid in dead:
        raise ValueError("this site is listed as dropped out, though it is answering: its private key stays here")
    if active & dead:
        raise ValueError(f"nodes {sorted(active & dead)[:3]} are listed both as active and dropped out")
    # A site answers one unmask request a round (Flower's stage order), so with a threshold
    # above half the shares no two groups of holders can give up both secrets of one site.


def _store_shares(state: Any, configs: ConfigRecord) -> list[int]:
    """Decrypt and check the shares the neighbours sent this site; store them; the neighbours' ids."""
    ciphertexts = cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    sources = cast(list[int], configs[Key.SOURCE_LIST])
    if len(ciphertexts) + 1 < state.threshold:
        raise ValueError(f"{len(ciphertexts)} neighbours sent shares; the threshold is {state.threshold}")
    neighbours = []
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        plaintext = decrypt(state.ss2_dict[source], ciphertext)
        actual, destination, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if actual != source or destination != state.nid:
            raise ValueError(f"a share from node {actual} to node {destination} arrived as one from {source} to me")
        state.rd_seed_share_dict[source] = seed_share
        state.sk1_share_dict[source] = key_share
        neighbours.append(source)
    return neighbours


def _masked_update(state: Any, neighbours: list[int], msg: Message, out: RecordDict) -> dict:
    """Replace the reply's adapter by its masked update.

    The update is the reply's adapter minus the global adapter of ``msg``; its quantised
    values (Flower's stochastic quantisation into ``[0, target_range]``) plus the private
    mask and the pairwise masks of every neighbour that sent shares, modulo ``mod_range``.
    A value beyond the quantisation range is clipped to it; the site says so in its own log
    only (a count sent per site would tell the coordinator something of its update).
    """
    global_arrays = from_array_record(msg.content.array_records["arrays"])
    adapter = from_array_record(out.array_records["arrays"])
    keys = sorted(global_arrays)  # the order the masks are drawn in, on every side
    update = [np.asarray(adapter[k], dtype=np.float64) - np.asarray(global_arrays[k], dtype=np.float64) for k in keys]
    quantized, clipped = quantize_update(update, state.clipping_range, state.target_range)
    if clipped:
        log.warning(
            "secure aggregation: %d update value(s) beyond the quantisation range ±%g were clipped to it",
            clipped,
            state.clipping_range,
        )
    pairwise = {
        node: generate_shared_key(bytes_to_private_key(state.sk1), bytes_to_public_key(state.public_keys_dict[node][0]))
        for node in neighbours
    }
    masked = mask(quantized, state.mod_range, state.rd_seed, pairwise, state.nid)
    del out["arrays"]
    out[MASKED_RECORD] = to_array_record(dict(zip(keys, masked, strict=True)))
    return {}
