"""One PRISM round in messages: what a client sends, what the server does with the bytes, what it
broadcasts, and how a client catches up. The simulator and the Flower apps both call these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prismfl.fl import server, wire


@dataclass
class RoundOutcome:
    scores: torch.Tensor  # the new global scores (CPU, float32)
    lam: float | None  # MADA's lambda, None without MADA
    broadcast: bytes  # the delta message that takes a client from the old scores to the new ones
    masks: list[torch.Tensor]  # the decoded uploads, in the order received
    entropy_bound_bits: float  # sum over uploads of -log2 P(mask | global probabilities)


def cross_entropy_bits(mask: torch.Tensor, scores: torch.Tensor) -> float:
    """-log2 of the probability of `mask` under Bernoulli(sigmoid(scores)): a coder's lower bound."""
    log_p = torch.nn.functional.logsigmoid(scores.double())  # log P(keep)
    log_q = torch.nn.functional.logsigmoid(-scores.double())  # log P(drop)
    return float(-torch.where(mask.cpu(), log_p.cpu(), log_q.cpu()).sum() / np.log(2))


def client_upload(
    mask: torch.Tensor, global_scores: torch.Tensor, *, round_: int, table_hash: int, coder: str
) -> bytes:
    return wire.encode_upload(mask.cpu(), global_scores.cpu(), round_=round_, table_hash=table_hash, coder=coder)


def server_round(
    global_scores: torch.Tensor,
    uploads: list[bytes],
    *,
    round_: int,
    table_hash: int,
    smoothing: float,
    mada: bool,
    rng: torch.Generator,
) -> RoundOutcome:
    """Decode the uploads, aggregate, apply MADA, and encode the broadcast delta."""
    scores = global_scores.cpu()
    masks = [wire.decode_upload(u, scores, round_=round_, table_hash=table_hash) for u in uploads]
    return aggregate_round(scores, masks, round_=round_, table_hash=table_hash, smoothing=smoothing, mada=mada,
                           rng=rng)  # fmt: skip


def aggregate_round(
    global_scores: torch.Tensor,
    masks: list[torch.Tensor],
    *,
    round_: int,
    table_hash: int,
    smoothing: float,
    mada: bool,
    rng: torch.Generator,
) -> RoundOutcome:
    """server_round on uploads already decoded (a server that validated each one as it arrived)."""
    scores = global_scores.cpu()
    counts = server.count_masks(masks)
    aggregate = server.aggregate_scores(counts, len(masks), smoothing)
    lam = server.mada_lambda(scores, aggregate, rng) if mada else None
    new_scores = server.blend(scores, aggregate, lam)
    delta = wire.encode_delta(counts, len(masks), lam, smoothing, scores, round_=round_, table_hash=table_hash)
    bound = sum(cross_entropy_bits(m, scores) for m in masks)
    return RoundOutcome(new_scores, lam, delta, masks, bound)


def apply_broadcast(global_scores: torch.Tensor, message: bytes, *, round_: int, table_hash: int) -> torch.Tensor:
    """Client side: rebuild the new global scores from the previous ones and the round's delta."""
    d = wire.decode_delta(message, global_scores.cpu(), round_=round_, table_hash=table_hash)
    return server.apply_round(global_scores.cpu(), d.counts, d.m, d.lam, d.smoothing)


def catch_up_rounds(last_synced: int, current: int, delta_sizes: dict[int, int], state_size: int) -> list[int] | None:
    """What a client that holds round `last_synced` needs to reach round `current`: the rounds whose
    deltas it missed, or None when the full state is smaller than those deltas."""
    missed = list(range(last_synced + 1, current + 1))
    return missed if sum(delta_sizes[r] for r in missed) <= state_size else None


def catch_up_bytes(last_synced: int, current: int, delta_sizes: dict[int, int], state_size: int) -> int:
    """The bytes of catch_up_rounds' choice."""
    rounds = catch_up_rounds(last_synced, current, delta_sizes, state_size)
    return state_size if rounds is None else sum(delta_sizes[r] for r in rounds)
