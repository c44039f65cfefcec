"""Secure aggregation that survives dropouts (privacy.dropouts, issue 38): Shamir's shares by hand, the
neighbour graph and threshold by hand, the exact sum of the survivors when up to 30% of the clients
drop after the key exchange, a clear error when more drop, the refusals that keep both of a client's
secrets from the server, and the noise of the recovered sum."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl import secagg
from prismfl.config import load_config
from prismfl.secagg import PRIME, Plan, SecAggClient, SecAggError, SecAggServer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def test_shamir_shares_by_hand():
    # f(x) = 5 + 3x: f(1) = 8, f(2) = 11, f(3) = 14; any two points give f(0) = 5
    assert secagg.split(5, 2, [1, 2, 3], [3]) == [8, 11, 14]
    assert secagg.combine({1: 8, 3: 14}) == 5 and secagg.combine({2: 11, 3: 14}) == 5
    # f(x) = 5 - x modulo the prime: f(6) = p - 1 wraps around; f(2) = 3
    assert secagg.split(5, 2, [6, 2], [PRIME - 1]) == [PRIME - 1, 3]
    assert secagg.combine({6: PRIME - 1, 2: 3}) == 5
    # f(x) = 7 + 2x + x^2: f(1) = 10, f(2) = 15, f(3) = 22; three points give 7, two give the line's 5
    assert secagg.split(7, 3, [1, 2, 3], [2, 1]) == [10, 15, 22]
    assert secagg.combine({1: 10, 2: 15, 3: 22}) == 7
    assert secagg.combine({1: 10, 2: 15}) == 5  # one share short: another secret, nothing of this one
    # a 32-byte secret with coefficients drawn as a client draws them
    secret = int.from_bytes(bytes(range(32)), "big")
    coeffs = secagg.coefficients(bytes(range(32)), secagg.SEED, bytes(32), 4)
    shares = secagg.split(secret, 5, [1, 2, 3, 4, 5, 6, 7], coeffs)
    assert secagg.combine(dict(zip([2, 3, 5, 6, 7], [shares[i] for i in (1, 2, 4, 5, 6)]))) == secret
    assert coeffs == secagg.coefficients(bytes(range(32)), secagg.SEED, bytes(32), 4)  # asked again: the same
    with pytest.raises(ValueError, match="needs 1 coefficients"):
        secagg.split(5, 2, [1], [])


def test_the_binomial_tail_by_hand():
    assert secagg.binomial_tail(2, 0.5, 1) == pytest.approx(0.75)
    assert secagg.binomial_tail(3, 0.3, 2) == pytest.approx(3 * 0.09 * 0.7 + 0.027)  # 0.216
    assert secagg.binomial_tail(3, 0.3, 0) == 1.0 and secagg.binomial_tail(3, 0.3, 4) == 0.0
    assert secagg.binomial_tail(5, 0.0, 1) == 0.0
    assert secagg.binomial_tail(4000, 0.5, 0) == 1.0 and 0 < secagg.binomial_tail(4000, 0.5, 2100) < 1e-3


def test_how_many_may_drop_and_the_noise_each_client_adds():
    assert secagg.min_survivors(10, 0.3) == 7 and secagg.min_survivors(10, 0.0) == 10
    assert secagg.min_survivors(3, 0.34) == 2 and secagg.min_survivors(20, 0.3) == 14  # (0.3 x 20 is 6.000...01)
    assert secagg.noise_share(10, 0.3, 1) == 1 / math.sqrt(6)
    assert secagg.noise_share(10, 0.0, 0) == 1 / math.sqrt(10)  # what every client added before dropouts


def test_the_neighbour_graph_and_the_threshold_by_hand():
    # few clients: every other one is a neighbour; t = min(M, max(c + 1, n // 2 + 1))
    assert secagg.plan(3, 3, 0.0, 0) == Plan(3, None, 2, 3)
    assert secagg.plan(10, 10, 0.3, 0) == Plan(10, None, 6, 7)
    assert secagg.plan(10, 10, 0.3, 6) == Plan(10, None, 7, 7)
    # 200 clients, 60 may drop (q = 0.3): (200 x 0.3^15)^2 = 8.2e-12 > 2^-40 = 9.1e-13 >= (200 x 0.3^16)^2 = 7.4e-13,
    # so h = 16: 32 neighbours; t = 7 is the largest with 200 x P(Bin(32, 0.3) > 32 - t) <= 2^-20
    p = secagg.plan(200, 200, 0.3, 0)
    assert p == Plan(200, 16, 7, 140) and p.holders == 33
    assert (200 * 0.3**15) ** 2 > secagg.SPLIT_ODDS >= (200 * 0.3**16) ** 2
    fails = lambda t: 200 * secagg.binomial_tail(32, 0.3, 32 - t + 1)  # noqa: E731
    assert fails(7) <= secagg.FAIL_ODDS < fails(8)
    # the degree grows as log n: 30 neighbours at 50 clients, 36 at 1,000, 40 at 10,000
    assert [secagg.plan(n, n, 0.3, 0).half_degree for n in (50, 1000, 10_000)] == [15, 18, 20]
    # no dropouts allowed, no colluders: a ring of 4 neighbours
    assert secagg.plan(200, 200, 0.0, 0) == Plan(200, 2, 4, 200)
    # 3 participants of 10 (7 dropped at set-up) with 7 needed: refused
    with pytest.raises(SecAggError, match="3 of the 10 clients take part, fewer than the 7"):
        secagg.plan(3, 10, 0.3, 0)


def test_the_ring():
    ids = [3, 5, 8, 13, 21, 34, 55]
    got = secagg.ring(ids, 2, random.Random(0))
    assert got == secagg.ring(ids, 2, random.Random(0))  # seeded: the same ring
    assert all(len(n) == 4 and k not in n for k, n in got.items())
    assert all(k in got[j] for k, n in got.items() for j in n)  # symmetric: i holds j's shares iff j holds i's
    assert secagg.ring(ids, None, random.Random(0))[5] == [3, 8, 13, 21, 34, 55]


def vectors(n: int, words: int = 40, seed: int = 0) -> dict[int, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return {k: secagg.encode(1000 * torch.randn(words, generator=gen, dtype=torch.float64)) for k in range(n)}


def protocol(n, dropouts, *, silent=None, change=None, colluders=0, words=40):
    """The secure sum of n clients in this process: `silent(stage, k)` drops a reply; `change(stage, k, reply)`
    alters one. Returns (server, clients)."""
    layout = [[words - 2], [1], [1]]
    m = secagg.min_survivors(n, dropouts)
    clients = {k: SecAggClient(w, layout, min_survivors=m, colluders=colluders) for k, w in vectors(n, words).items()}
    server = SecAggServer({k: c.public() for k, c in clients.items()}, layout, num_clients=n, dropouts=dropouts,
                          colluders=colluders, table_hash=7, rng=random.Random(1))  # fmt: skip
    for stage in secagg.STAGES:
        replies = {k: clients[k].answer(k, stage, r) for k, r in server.requests(stage).items()
                   if not (silent and silent(stage, k))}  # fmt: skip
        if change:
            for k, reply in replies.items():
                change(stage, k, reply)
        server.take(stage, replies, {k: "silent" for k in server.requests(stage) if k not in replies})
    return server, clients


def exact_sum(clients, ids) -> list[int]:
    total = sum(clients[k].words.view(np.int64).astype(object) for k in ids)
    return [int((v + 2**63) % 2**64 - 2**63) for v in total]


def recovered(server) -> list[int]:
    return secagg.encode(secagg.flatten(server.result())[0]).view(np.int64).tolist()


@pytest.mark.parametrize(
    "silent",
    {
        "3 of 10 after the key exchange": lambda stage, k: stage != "shares" and k in (1, 4, 7),
        "1 before its shares, 2 after": lambda stage, k: k == 9 or (stage != "shares" and k in (0, 5)),
        "3, and a holder at unmasking": lambda stage, k: (stage != "shares" and k in (2, 3, 6)) or
                                                         (stage == "unmask" and k == 8),
    }.items(),
    ids=lambda s: s[0],
)  # fmt: skip
def test_the_sum_of_the_survivors_is_recovered_exactly_when_30_percent_drop(silent):
    server, clients = protocol(10, 0.3, silent=silent[1])
    assert len(server.survivors) == 7
    assert recovered(server) == exact_sum(clients, server.survivors)
    assert all(why.endswith("silent") for why in server.dropped.values())


def test_a_sparse_graph_recovers_the_sum_with_a_few_neighbours_each():
    """50 clients: 30 neighbours each (not 49), 6 of 31 shares rebuild a secret; 15 drop."""
    dropped = set(range(0, 50, 10)) | set(range(3, 50, 5))
    assert len(dropped) == 15
    server, clients = protocol(50, 0.3, silent=lambda stage, k: stage != "shares" and k in dropped)
    assert server.plan == Plan(50, 15, 6, 35)
    assert {len(v) for v in server.neighbours.values()} == {30} and {len(h) for h in server.holders.values()} == {31}
    assert recovered(server) == exact_sum(clients, server.survivors)
    assert sorted(server.dropped) == sorted(dropped)


def test_fewer_survivors_than_allowed_is_a_clear_error():
    with pytest.raises(SecAggError, match="6 of 10 clients sent their masked vector, fewer than the 7 each client's "
                                          "share of the noise assumes"):  # fmt: skip
        protocol(10, 0.3, silent=lambda stage, k: stage != "shares" and k < 4)
    # a secret that too few holders answer for: 3 dropped, then 2 more holders silent at unmasking (t = 6 of 7)
    with pytest.raises(SecAggError, match="client 0's mask key cannot be rebuilt: 5 of its holders gave a share"):
        protocol(10, 0.3, silent=lambda stage, k: (stage != "shares" and k < 3) or (stage == "unmask" and k in (3, 4)))


def unmask_request(n=5, dropouts=0.2, silent=(4,)):
    """A client, the server and the unmask requests of a protocol run up to its last stage."""
    layout = [[2], [1], [1]]
    m = secagg.min_survivors(n, dropouts)
    clients = {k: SecAggClient(w, layout, min_survivors=m) for k, w in vectors(n, 4).items()}
    server = SecAggServer({k: c.public() for k, c in clients.items()}, layout, num_clients=n, dropouts=dropouts,
                          colluders=0, table_hash=7, rng=random.Random(1))  # fmt: skip
    for stage in ("shares", "masked"):
        server.take(stage, {k: clients[k].answer(k, stage, r) for k, r in server.requests(stage).items()
                            if stage == "shares" or k not in silent})  # fmt: skip
    return clients, server, server.requests("unmask")


def test_a_client_never_gives_the_server_both_secrets_of_one_client():
    clients, server, requests = unmask_request()
    a, request = clients[0], requests[0]
    assert request["owners"] == [0, 1, 2, 3, 4] and request["kinds"] == [0, 0, 0, 0, 1]  # 4 dropped: its mask key
    with pytest.raises(SecAggError, match="refused: the server would unmask the sum of 3 clients' vectors, fewer than "
                                          "the 4"):  # fmt: skip
        a.answer(0, "unmask", {**request, "survivors": 3})
    with pytest.raises(SecAggError, match="refused: client 0 is asked for a share of its own mask key"):
        a.answer(0, "unmask", {**request, "kinds": [1, 0, 0, 0, 1]})
    first = a.answer(0, "unmask", request)
    assert a.answer(0, "unmask", request) == first  # the same question again: the same answer
    with pytest.raises(SecAggError, match="refused: this client answered another unmask request already"):
        a.answer(0, "unmask", {**request, "kinds": [0, 0, 0, 0, 0]})  # now 4's seed too: refused
    from prismfl import safestate

    back = SecAggClient.from_tree(safestate.from_bytes(safestate.to_bytes(a.to_tree())))  # (Flower: saved state)
    with pytest.raises(SecAggError, match="answered another unmask request"):
        back.answer(0, "unmask", {**request, "kinds": [0, 0, 0, 0, 0]})
    # a sealed pair that does not open (altered, or for another holder) gives an empty share, not an error
    swapped = {**request, "sealed": [request["sealed"][1], *request["sealed"][1:]]}
    assert clients[1].answer(1, "unmask", {**requests[1], "sealed": swapped["sealed"]})["shares"][0] == b""


def test_a_false_share_is_caught_by_its_commitment_and_its_holder_ignored():
    def lie(stage, k, reply):
        if stage == "unmask" and k == 5:
            reply["shares"][0] = bytes(secagg.SHARE_BYTES)

    server, clients = protocol(10, 0.3, silent=lambda stage, k: stage != "shares" and k in (1, 4), change=lie)
    assert server.dropped[5] == "unmask: its share of client 0's seed is not the one client sent it"
    assert recovered(server) == exact_sum(clients, server.survivors)  # the others' shares suffice
    assert 5 in server.survivors  # its own vector stays in the sum


def test_a_late_vector_stays_hidden_by_its_seed():
    """Client 4 is declared dropped (the server rebuilds its mask key), then its vector comes: without its
    seed, which no holder gave, the server sees its vector plus the seed's mask, uniform noise."""
    words = 4000
    clients, server, requests = unmask_request(silent=(4,))
    server.take("unmask", {k: clients[k].answer(k, "unmask", r) for k, r in requests.items()})
    late = SecAggClient(vectors(1, words)[0], [[words - 2], [1], [1]], min_survivors=4)
    request = {"context": server.context, "peers": [0, 1, 2, 3], "mask-keys": [server.mask_keys[j] for j in range(4)]}
    late.key = clients[4].key  # (the key the server rebuilt: it can take the pairwise masks off)
    seen = np.frombuffer(late.answer(4, "masked", request)["masked"], dtype=np.uint64).copy()
    for j in range(4):
        m = secagg.mask(late.key, 4, j, server.mask_keys[j], server.context, words)
        seen = seen - m if 4 < j else seen + m
    assert np.array_equal(seen - secagg.self_mask(late.seed, 4, server.context, words), late.words)
    assert (seen != late.words).mean() > 0.999
    assert abs((seen >> np.uint64(63)).astype(float).mean() - 0.5) < 0.05


def test_the_recovered_sums_noise_is_the_central_noise_whoever_drops():
    """Each of K = 10 clients adds std sigma / sqrt(M - c) with M = 7 (privacy.dropouts = 0.3), c = 1: the
    sum of any S >= M survivors' shares, less the colluder's, has variance (S - c) sigma^2 / (M - c) >=
    sigma^2, exactly sigma^2 when 3 drop; checked on the variances, then on drawn noise."""
    from prismfl.privacy import private_feature_stats

    share = secagg.noise_share(10, 0.3, 1)
    for survivors in range(7, 11):
        assert (survivors - 1) * share**2 >= 1 - 1e-12
    assert (7 - 1) * share**2 == pytest.approx(1, abs=1e-12)
    assert 10 * share**2 == pytest.approx(10 / 6)  # the cost when none drops: variance x 10/6 (no dropouts: 10/9)
    images = torch.rand(50, 4000, dtype=torch.float32)
    extract = lambda x: [x]  # noqa: E731
    exact = private_feature_stats(extract, images, [60.0], math.inf, 1e-5).shared["sums"][0] / 60
    noise = [private_feature_stats(extract, images, [60.0], 1.0, 1e-5, generator=torch.Generator().manual_seed(i),
                                   noise_share=share).shared["sums"][0] / 60 - exact for i in range(7)]  # fmt: skip
    rel = private_feature_stats(extract, images, [60.0], 1.0, 1e-5, generator=torch.Generator().manual_seed(0))
    sigma = rel.noise_multiplier * rel.sensitivity
    assert float(sum(noise).std()) == pytest.approx(sigma * math.sqrt(7 / 6), rel=0.05)  # 7 survivors
    assert float(sum(noise[1:]).std()) == pytest.approx(sigma, rel=0.05)  # less the colluder's


OVERRIDES = ["partition.num_clients=10", "privacy.epsilon=4", "privacy.pool=1", "privacy.secagg=true",
             "privacy.dropouts=0.3", "faults.dropout=0.3", "train.rounds=1", "train.sample_every=0",
             "train.local_steps=1"]  # fmt: skip


@needs_fmnist
def test_a_simulated_run_goes_on_when_30_percent_drop_out_of_the_secure_sum(tmp_path, monkeypatch):
    """seed 5: faults.dropout draws clients 0, 2 and 8 for round 0, the secure sum: they send their shares,
    then nothing. The run goes on against the exact sum of the 7 others' vectors, whose noise is the
    central release's: 7 shares of sigma / sqrt(7)."""
    from prismfl import privacy, rundir
    from prismfl.fl import faults, simulate

    cfg = load_config(SMOKE, ["seed=5", *OVERRIDES])
    assert sorted(faults.draw(cfg, 0, list(range(10)))) == [0, 2, 8]
    words, sums = {}, []
    real_answer, real_result = SecAggClient.answer, SecAggServer.result

    def answer(self, my_id, stage, request):
        words[my_id] = self.words
        return real_answer(self, my_id, stage, request)

    def result(self):
        sums.append((real_result(self), list(self.survivors)))
        return sums[-1][0]

    monkeypatch.setattr(SecAggClient, "answer", answer)
    monkeypatch.setattr(SecAggServer, "result", result)
    logs: list[str] = []
    out = simulate.train(cfg, tmp_path / "run", log=logs.append)
    summed, survivors = sums[0]
    assert survivors == [1, 3, 4, 5, 6, 7, 9]
    total = sum(words[k].view(np.int64).astype(object) for k in survivors)
    assert secagg.encode(secagg.flatten(summed)[0]).view(np.int64).tolist() == list(total)
    for k in (0, 2, 8):
        assert f"secure aggregation: client {k} dropped out at masked: dropped out mid-round (simulated fault)" in logs
    assert any("secure aggregation: 7 of 10 clients summed (every other client each, 6 of 10 shares rebuild a "
               "secret, at least 7 needed)" in line for line in logs)  # fmt: skip
    assert any("(each client adds std" in line and "against up to 0 colluding clients, with up to 3 of the 10 clients "
               "dropping out)" in line for line in logs)  # fmt: skip
    assert rundir.read_metrics(out)[-1]["round"] == 1
    ckpt = rundir.load_checkpoint(out)
    pooled = privacy.stats_of_sum(summed, 0)
    for c in ckpt["clients"]["clients"]:  # the dropped clients too train against the pooled statistics
        p = c["privacy"]
        assert p["min_survivors"] == 7 and p["client_noise_std"] == pytest.approx(p["noise_std"] / math.sqrt(7))
        assert 7 * p["client_noise_std"] ** 2 == pytest.approx(p["noise_std"] ** 2)  # the sum's noise: sigma
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(c["stats"]["mean"], pooled.mean))


@needs_fmnist
def test_a_simulated_run_stops_when_more_drop_than_privacy_dropouts_allows(tmp_path):
    """seed 0: 4 of the 10 clients drop out of the secure sum, 7 must remain: the run stops before any round."""
    from prismfl import rundir
    from prismfl.errors import PrismError
    from prismfl.fl import simulate

    why = r"secure aggregation: 6 of 10 clients sent their masked vector, fewer than the 7 .*start it again .*client 3"
    with pytest.raises(PrismError, match=why + ": masked: dropped out mid-round"):
        simulate.train(load_config(SMOKE, ["seed=0", *OVERRIDES]), tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run" / rundir.CHECKPOINT).exists()
