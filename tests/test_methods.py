"""Each method's server side on fake uploads, hand-computed (the way Flower tests its strategies), and
PRISM's round in messages: what clients rebuild from the broadcasts is what the server holds."""

import math
from pathlib import Path

import pytest
import torch

from prismfl.config import load_config
from prismfl.fl import aggregate, wire
from prismfl.fl.methods import prism
from prismfl.fl.methods.base import scores_crc
from prismfl.fl.methods.registry import REGISTRY, build
from prismfl.privacy import Private

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
N = 4
TABLE = wire.layer_table_hash([("w", (N,))])
CLIENT = 0


def method(name: str, *overrides: str):
    return build(load_config(SMOKE, [f'train.method="{name}"', *overrides]))


def bits(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def prism_state(scores, k: int = 3) -> dict:
    return {"num_weights": len(scores), "table_hash": TABLE, "scores": torch.tensor(scores, dtype=torch.float32),
            "synced": [0] * k, "delta_sizes": {}, "deltas": {}}  # fmt: skip


def upload(mask: torch.Tensor, scores: torch.Tensor, rnd: int = 1) -> tuple[bytes, torch.Tensor]:
    return wire.encode_upload(mask, scores, round_=rnd, table_hash=TABLE, client=CLIENT, coder="packed"), mask


def floats(values, rnd: int = 1, client: int = 0) -> tuple[bytes, torch.Tensor]:
    t = torch.tensor(values, dtype=torch.float32)
    return wire.encode_state(t, round_=rnd, table_hash=TABLE, client=client), t


def test_registry_names_every_method_and_privacy_wraps():
    assert sorted(REGISTRY) == ["central", "fedavg", "local", "prism", "public"]
    assert type(method("prism")).__name__ == "Prism"
    private = method("fedavg", "privacy.epsilon=10")
    assert isinstance(private, Private) and private.name == "fedavg"


def test_prism_aggregate_without_mada_is_the_smoothed_mean():
    m = method("prism", "train.mada=false")
    state = prism_state([0.0] * N)
    ups = {0: upload(bits(1, 1, 0, 0), state["scores"]), 2: upload(bits(1, 0, 0, 1), state["scores"])}
    out = m.aggregate(state, 1, ups, sizes=[1, 1, 1])
    # each bit -> 0.01 / 0.99, averaged: [0.99, 0.5, 0.01, 0.5]
    assert torch.sigmoid(state["scores"].double()).tolist() == pytest.approx([0.99, 0.5, 0.01, 0.5], abs=1e-6)
    assert out.lam is None
    assert out.upload_bytes == 2 * (wire.HEADER.size + 1)  # header + ceil(4 / 8) packed bytes
    assert out.entropy_bound_bits == pytest.approx(8.0)  # p = 1/2 everywhere: 1 bit per weight per upload
    assert out.broadcast_bytes == state["delta_sizes"][1] > wire.HEADER.size + 4 * N
    assert state["deltas"] == {}  # a delta larger than the full state is never sent, so never kept


def test_prism_broadcast_carries_the_counts():
    n = 64
    m = method("prism", "train.mada=false")
    state = prism_state([0.0] * n)
    state["table_hash"] = table = wire.layer_table_hash([("w", (n,))])
    masks = [torch.arange(n) % 2 == 0, torch.arange(n) % 3 == 0]
    ups = {k: (wire.encode_upload(x, state["scores"], round_=1, table_hash=table, client=k, coder="packed"), x)
           for k, x in enumerate(masks)}  # fmt: skip
    m.aggregate(state, 1, ups, sizes=[1, 1, 1])
    delta = wire.decode_delta(state["deltas"][1].numpy().tobytes(), torch.zeros(n), round_=1, table_hash=table)
    assert delta.counts.tolist() == [int(a) + int(b) for a, b in zip(*masks)] and delta.m == 2 and delta.lam is None


def test_prism_aggregate_with_mada_blends_by_the_hamming_distance():
    m = method("prism", "train.mada=true")
    state = prism_state([20.0] * N)  # scores at +-20: both sampled masks are certain
    ups = {1: upload(bits(1, 0, 0, 1), state["scores"])}
    out = m.aggregate(state, 1, ups, sizes=[1, 1, 1])
    # old mask [1,1,1,1], new aggregate keeps [1,0,0,1] (p = 0.99 / 0.01, logit +-4.595) -> lambda 1/2
    assert out.lam == 0.5
    up, down = (20 + math.log(99)) / 2, (20 - math.log(99)) / 2
    assert state["scores"].tolist() == pytest.approx([up, down, down, up], rel=1e-5)


def test_prism_plan_sends_deltas_or_the_full_state_and_counts_them():
    n = 64
    m = method("prism", "train.client_fraction=1.0")
    state = prism_state([0.0] * n)
    state["table_hash"] = table = wire.layer_table_hash([("w", (n,))])
    state["synced"] = [0, None, 0]
    plan = m.plan(state, 1)
    full = wire.HEADER.size + 4 * n
    assert plan.clients == [0, 1, 2] and plan.download_bytes == full  # round 1: only the unknown client pays
    assert plan.downlinks[0].messages == [] and len(plan.downlinks[1].messages[0]) == full
    assert plan.downlinks[2].check == scores_crc(state["scores"]) and state["synced"] == [0, 0, 0]
    mask = torch.arange(n) % 2 == 0
    data = wire.encode_upload(mask, state["scores"], round_=1, table_hash=table, client=CLIENT, coder="packed")
    m.aggregate(state, 1, {k: (data, mask) for k in range(3)}, [1, 1, 1])
    m.client_lost(state, 2)
    plan = m.plan(state, 2)
    d1 = state["delta_sizes"][1]
    assert plan.download_bytes == 2 * d1 + full
    assert [len(x) for x in plan.downlinks[0].messages] == [d1]


def test_prism_sends_a_large_full_state_range_coded_and_the_client_rebuilds_it_bit_for_bit():
    n = 20_000
    scores = torch.where(torch.arange(n) % 3 == 0, 4.59512, -4.59512)  # a confident state: two values
    scores[::7] = torch.randn(len(scores[::7]), generator=torch.Generator().manual_seed(0))
    state = prism_state(scores.tolist())
    state["synced"] = [None, None, None]
    plan = method("prism", "train.client_fraction=1.0").plan(state, 1)
    (message,) = plan.downlinks[0].messages
    assert message[6] == wire.CODER_PLANES and len(message) < (wire.HEADER.size + 4 * n) / 2
    assert plan.download_bytes == 3 * len(message)
    held, replica = prism.catch_up(torch.zeros(n), 0, [message], num_weights=n, table_hash=TABLE)
    assert held == 0 and torch.equal(replica, state["scores"]) and scores_crc(replica) == plan.downlinks[0].check
    raw = method("prism", "train.client_fraction=1.0", 'train.broadcast="float32"').plan(state, 1)
    assert raw.downlinks[0].messages[0][6] == wire.CODER_FLOAT32  # the paper's float broadcast stays raw


def test_catch_up_rounds():
    sizes = {1: 10, 2: 20, 3: 30}
    assert prism.catch_up_rounds(3, 3, sizes, 1000) == []
    assert prism.catch_up_rounds(1, 3, sizes, 1000) == [2, 3]
    assert prism.catch_up_rounds(0, 3, sizes, 60) == [1, 2, 3]  # a tie sends the deltas
    assert prism.catch_up_rounds(0, 3, sizes, 40) is None  # the full state is cheaper
    deltas = {r: torch.zeros(s, dtype=torch.uint8) for r, s in sizes.items()}
    prism.prune(deltas, 50)
    assert sorted(deltas) == [2, 3]  # the newest whose sum fits a full state


def test_prism_decode_checks_the_round():
    m = method("prism")
    state = prism_state([0.0] * N)
    data, mask = upload(bits(1, 0, 1, 1), state["scores"], rnd=3)
    assert torch.equal(m.decode(state, 3, CLIENT, data), mask)
    with pytest.raises(wire.UnexpectedMessage, match="round 4"):
        m.decode(state, 4, CLIENT, data)


def test_fedavg_aggregate_is_the_size_weighted_mean():
    m = method("fedavg")
    state = {"num_weights": N, "table_hash": TABLE, "weights": torch.zeros(N)}
    ups = {0: floats([1, 2, 3, 4]), 2: floats([5, 6, 7, 8])}
    out = m.aggregate(state, 1, ups, sizes=[1, 100, 3])  # client 1 did not answer: its size is ignored
    assert state["weights"].tolist() == [4.0, 5.0, 6.0, 7.0]  # (1 x a + 3 x b) / 4
    assert (
        out.upload_bytes == 2 * (wire.HEADER.size + 4 * N)
        and out.broadcast_bytes == wire.HEADER.size + 4 * N
        and out.lam is None
    )
    plan = m.plan(state, 2)
    assert plan.download_bytes == len(plan.clients) * (wire.HEADER.size + 4 * N)
    (msg,) = plan.downlinks[plan.clients[0]].messages
    assert wire.decode_state(msg, num_weights=N, table_hash=TABLE)[0] == 1
    with pytest.raises(wire.UnexpectedMessage, match="round 2"):
        m.decode(state, 2, 0, ups[0][0])


def test_local_keeps_every_clients_own_scores_and_counts_nothing():
    m = method("local")
    state = {"num_weights": N, "table_hash": TABLE, "params": [torch.zeros(N) for _ in range(3)]}
    out = m.aggregate(state, 1, {1: floats([1, -1, 1, -1])}, sizes=[1, 1, 1])
    assert state["params"][1].tolist() == [1, -1, 1, -1] and state["params"][0].tolist() == [0] * N
    assert (out.upload_bytes, out.broadcast_bytes, out.lam) == (0, 0, None)
    assert out.mask_entropy == pytest.approx(1.0)  # client 0's scores: p = 1/2
    plan = m.plan(state, 1)
    assert plan.download_bytes == 0 and all(d.messages == [] for d in plan.downlinks.values())


def test_central_trains_one_pooled_client_for_the_rounds_steps():
    m = method("central", "train.client_fraction=0.67")
    state = {"num_weights": N, "table_hash": TABLE, "scores": torch.zeros(N)}
    plan = m.plan(state, 1)
    assert list(plan.downlinks) == [0] and len(plan.clients) == 2
    assert plan.downlinks[0].steps == 2 * m.cfg.train.local_steps and plan.download_bytes == 0
    assert m.holds_data(0) and not m.holds_data(1)
    m.aggregate(state, 1, {0: floats([3, 0, -3, 0])}, sizes=[1, 1, 1])
    assert state["scores"].tolist() == [3, 0, -3, 0]


def test_clients_rebuild_the_server_state_every_round():
    n = 300
    table = wire.layer_table_hash([("w", (n,))])
    for mada in (False, True):
        m = method("prism", f"train.mada={str(mada).lower()}")
        start = torch.randn(n, generator=torch.Generator().manual_seed(0))
        state = {"num_weights": n, "table_hash": table, "scores": start,
                 "synced": [0] * 3, "delta_sizes": {}, "deltas": {}}  # fmt: skip
        held, replica = 0, state["scores"].clone()  # a client that follows every broadcast
        for rnd in range(1, 6):
            scores = state["scores"]
            ups = {}
            for k in range(3):
                mask = aggregate.sample_mask(scores + k, torch.Generator().manual_seed(10 * rnd + k))
                data = wire.encode_upload(mask, scores, round_=rnd, table_hash=table, client=k, coder="auto")
                ups[k] = (data, m.decode(state, rnd, k, data))
                assert torch.equal(ups[k][1], mask)
            out = m.aggregate(state, rnd, ups, [1, 1, 1])
            held, replica = prism.catch_up(replica, held, [state["deltas"][rnd].numpy().tobytes()],
                                           num_weights=n, table_hash=table)  # fmt: skip
            assert held == rnd and torch.equal(replica, state["scores"])
            assert (out.lam is None) == (not mada)
            assert sum(len(u) for u, _ in ups.values()) * 8 >= out.entropy_bound_bits


def test_the_engine_rejects_every_copy_of_a_duplicated_payload():
    from prismfl.fl.engine import reject_duplicates

    a = wire.encode_upload(bits(1, 0, 1, 1), torch.zeros(N), round_=1, table_hash=TABLE, client=0, coder="packed")
    b = wire.encode_upload(bits(1, 0, 1, 1), torch.zeros(N), round_=1, table_hash=TABLE, client=2, coder="packed")
    c = wire.encode_upload(bits(0, 0, 1, 1), torch.zeros(N), round_=1, table_hash=TABLE, client=3, coder="packed")
    uploads = {0: (a, None), 2: (b, None), 3: (c, None)}  # client 2 sent client 0's mask under its own name
    failures = reject_duplicates(uploads)
    assert list(uploads) == [3] and [f["client"] for f in failures] == [0, 2]
    assert "the same payload as clients [0, 2]" in failures[0]["error"]
