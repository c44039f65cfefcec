"""Secure aggregation with distributed noise (privacy.secagg, issue 13): the masks cancel exactly,
a masked vector hides its client's, the distributed noise adds up to one central release's, hostile
keys and messages are refused, and a run trains every client against the secure sum alone. The
dropout recovery (issue 38) is tested in test_secagg_recovery.py."""

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
from prismfl.errors import ConfigError
from prismfl.secagg import SecAggClient, SecAggError, SecAggServer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
D = torch.float64


def release(gen, rows=0, dims=(5, 3)):
    shape = (lambda d: (rows, d)) if rows else (lambda d: (d,))
    return {"sums": [100 * torch.randn(shape(d), generator=gen, dtype=D) for d in dims],
            "squares": [100 * torch.rand(shape(d), generator=gen, dtype=D) for d in dims],
            "counts": 50 * torch.rand(max(rows, 1), generator=gen, dtype=D)}  # fmt: skip


def clients_of(parts: dict, survivors: int | None = None) -> dict[int, SecAggClient]:
    m = survivors or len(parts)
    return {k: SecAggClient.of_release(p, min_survivors=m) for k, p in parts.items()}


def run_protocol(clients: dict[int, SecAggClient], *, dropouts=0.0, colluders=0, change=None):
    """The three stages over clients in this process: (server, {stage: {client: reply}}); `change(stage, k,
    request)` may alter a request before client k answers it."""
    server = SecAggServer({k: c.public() for k, c in clients.items()}, clients[min(clients)].layout,
                          num_clients=len(clients), dropouts=dropouts, colluders=colluders, table_hash=7,
                          rng=random.Random(0))  # fmt: skip
    sent = {}
    for stage in secagg.STAGES:
        requests = server.requests(stage)
        if change:
            for k, r in requests.items():
                change(stage, k, r)
        sent[stage] = {k: clients[k].answer(k, stage, r) for k, r in requests.items()}
        server.take(stage, sent[stage])
    return server, sent


def test_the_masks_cancel_and_the_sum_is_exact_in_fixed_point():
    gen = torch.Generator().manual_seed(0)
    parts = {k: release(gen, rows=3) for k in (0, 2, 5, 7)}  # ids need not be contiguous
    server, _ = run_protocol(clients_of(parts))
    total = server.result()
    for key in ("sums", "squares"):
        for i in range(2):
            want = sum(p[key][i] for p in parts.values())
            assert total[key][i].shape == want.shape
            assert float((total[key][i] - want).abs().max()) <= 4 * 2.0**-secagg.FRACTION_BITS  # one rounding each
    exact = sum(secagg.encode(secagg.flatten(p)[0]).view(np.int64).astype(object) for p in parts.values())
    assert total["counts"].tolist() == [float(v) / 2**secagg.FRACTION_BITS for v in exact[-3:]]
    assert server.survivors == [0, 2, 5, 7] and server.dropped == {}


def test_a_masked_vector_looks_nothing_like_its_clients_vector():
    gen = torch.Generator().manual_seed(1)
    clients = clients_of({k: release(gen, dims=(4000,)) for k in range(3)})
    _, sent = run_protocol(clients)
    for k, c in clients.items():
        words = np.frombuffer(sent["masked"][k]["masked"], dtype=np.uint64)
        assert (words != c.words).mean() > 0.999
        top = (words >> np.uint64(63)).astype(float)  # the sign bit of the plain words is 0 or 1 by sign only
        assert abs(top.mean() - 0.5) < 0.05


def test_masks_bind_the_run_context_and_the_participants():
    """A client that masks for another run (another context) does not cancel: the sum is garbage."""
    gen = torch.Generator().manual_seed(2)
    parts = {k: release(gen) for k in range(3)}

    def other_run(stage, k, request):
        if stage == "masked" and k == 1:
            request["context"] = secagg.context_of(8, [0, 1, 2])

    server, _ = run_protocol(clients_of(parts), change=other_run)
    want = sum(p["sums"][0] for p in parts.values())
    assert float((server.result()["sums"][0] - want).abs().max()) > 1e3
    assert secagg.context_of(7, [0, 1, 2]) != secagg.context_of(7, [0, 1, 3]) != secagg.context_of(8, [0, 1, 3])
    assert len(secagg.context_of(7, range(5000))) == secagg.CONTEXT_BYTES  # whatever the number of participants


def test_the_distributed_noise_adds_up_to_one_central_release():
    """K = 4 clients adding std sigma / sqrt(K) each: one client's share has std sigma / 2, and the sum
    of the K shares has std sigma, what one central release of the summed data would carry."""
    from prismfl.privacy import private_feature_stats

    images = torch.rand(50, 2000, dtype=torch.float32)
    extract = lambda x: [x]  # noqa: E731
    clip, k = [40.0], 4  # rows have norm about 26: nothing is clipped
    exact = private_feature_stats(extract, images, clip, math.inf, 1e-5).shared["sums"][0] / clip[0]
    shares = []
    for i in range(k):
        rel = private_feature_stats(extract, images, clip, 1.0, 1e-5, generator=torch.Generator().manual_seed(i),
                                    noise_share=secagg.noise_share(k, 0.0, 0))  # fmt: skip
        shares.append(rel.shared["sums"][0] / clip[0] - exact)
    sigma = rel.noise_multiplier * rel.sensitivity
    assert float(shares[0].std()) == pytest.approx(sigma / 2, rel=0.05)
    assert float(sum(shares).std()) == pytest.approx(sigma, rel=0.05)


def test_hostile_keys_layouts_and_messages_are_refused():
    gen = torch.Generator().manual_seed(3)
    clients = clients_of({k: release(gen) for k in range(3)})
    server = SecAggServer({k: c.public() for k, c in clients.items()}, clients[0].layout, num_clients=3,
                          dropouts=0.0, colluders=0, table_hash=7, rng=random.Random(0))  # fmt: skip
    shares = server.requests("shares")
    a, keys = clients[0], shares[0]["share-keys"]
    with pytest.raises(SecAggError, match="do not include it with its own key"):
        a.answer(0, "shares", {**shares[0], "share-keys": [keys[1], keys[1], keys[2]]})
    with pytest.raises(SecAggError, match=r"threshold must be an integer in \[1, 3\]"):
        a.answer(0, "shares", {**shares[0], "threshold": 4})
    with pytest.raises(SecAggError, match="unusable"):
        a.answer(0, "shares", {**shares[0], "share-keys": [keys[0], bytes(32), keys[2]]})  # a small-order key
    with pytest.raises(SecAggError, match="increasing client ids"):
        a.answer(0, "shares", {**shares[0], "holders": [0, 2, 1]})
    with pytest.raises(SecAggError, match="lacks 'context'"):
        a.answer(0, "shares", {k: v for k, v in shares[0].items() if k != "context"})
    with pytest.raises(SecAggError, match="no secure-aggregation stage"):
        a.answer(0, "sum", shares[0])
    server.take("shares", {k: c.answer(k, "shares", shares[k]) for k, c in clients.items()})
    masked = server.requests("masked")
    pk = masked[0]["mask-keys"]
    with pytest.raises(SecAggError, match="mask-keys must be 2 byte strings of 32 bytes"):
        a.answer(0, "masked", {**masked[0], "mask-keys": [pk[0], b"short"]})
    with pytest.raises(SecAggError, match="unusable"):
        a.answer(0, "masked", {**masked[0], "mask-keys": [pk[0], bytes(32)]})
    with pytest.raises(SecAggError, match="among its own peers"):
        a.answer(0, "masked", {**masked[0], "peers": [0, 1], "mask-keys": [pk[0], pk[0]]})
    for layout in ([[5]], [[5], [5], [1], [2]], [[0], [0], [1]], [[1 << 40], [1], [1]], "[[5]]"):
        with pytest.raises(SecAggError):
            secagg.check_layout(layout)
    with pytest.raises(SecAggError, match="over"):
        secagg.encode(torch.tensor([2.0**39], dtype=D))
    with pytest.raises(SecAggError, match="not finite"):
        secagg.encode(torch.tensor([float("nan")], dtype=D))


def test_a_bad_reply_drops_its_client_not_the_sum():
    """Every field of a reply is checked before use: a reply of the wrong type or size drops its client
    (with the reason), as if it had dropped out, and never the secure sum (with dropouts allowed)."""
    gen = torch.Generator().manual_seed(5)
    parts = {k: release(gen) for k in range(6)}
    clients = clients_of(parts, survivors=3)
    server = SecAggServer({k: c.public() for k, c in clients.items()}, clients[0].layout, num_clients=6,
                          dropouts=0.5, colluders=0, table_hash=7, rng=random.Random(0))  # fmt: skip
    bad = {
        "shares": {1: {"sealed": "x", "commitments": []}, 2: ["not a table"]},
        "masked": {3: {"masked": b"\0" * 8}},
    }
    for stage in secagg.STAGES:
        replies = {k: clients[k].answer(k, stage, r) for k, r in server.requests(stage).items()}
        server.take(stage, {**replies, **bad.get(stage, {})})
    assert server.dropped == {1: f"shares: sealed must be {server.plan.holders} byte strings of 148 bytes",
                              2: "shares: the reply lacks 'sealed'",
                              3: "masked: the masked vector must be 136 bytes"}  # fmt: skip
    exact = sum(clients[k].words.view(np.int64).astype(object) for k in (0, 4, 5))
    assert secagg.encode(secagg.flatten(server.result())[0]).view(np.int64).tolist() == list(exact)


def test_a_client_state_round_trips_and_a_damaged_one_is_refused():
    from prismfl import safestate

    gen = torch.Generator().manual_seed(4)
    clients = clients_of({k: release(gen) for k in range(2)})
    server = SecAggServer({k: c.public() for k, c in clients.items()}, clients[0].layout, num_clients=2,
                          dropouts=0.0, colluders=0, table_hash=7, rng=random.Random(0))  # fmt: skip
    a = clients[0]
    back = SecAggClient.from_tree(safestate.from_bytes(safestate.to_bytes(a.to_tree())))
    request = server.requests("shares")[0]
    assert back.answer(0, "shares", request) == a.answer(0, "shares", request)  # the same keys, seed and shares
    assert (back.min_survivors, back.colluders, back.answered) == (2, 0, b"")
    tree = a.to_tree()
    tree["words"] = tree["words"][:-1]
    with pytest.raises(SecAggError, match="not usable"):
        SecAggClient.from_tree(tree)
    tree = a.to_tree()
    del tree["share_private"]  # a state from before the dropout recovery
    with pytest.raises(SecAggError, match="not usable"):
        SecAggClient.from_tree(tree)


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["privacy.epsilon=1", "privacy.secagg=true"], "privacy.pool = 1"),
        (["privacy.epsilon=1", "privacy.pool=0.5", "privacy.secagg=true"], "privacy.pool = 1"),
        (["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", "model.conditional=true",
          "train.batch_size=20"], "pool_classes = 'all'"),
        (["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", 'train.method="fedavg"'], "prism"),
        (["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", "privacy.colluders=3"], r"\[0, 2\]"),
        (["privacy.epsilon=1", "privacy.colluders=1"], "colluders is for privacy.secagg"),
        (["privacy.epsilon=1", "privacy.dropouts=0.3"], "dropouts is for privacy.secagg"),
        (["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", "privacy.dropouts=0.6"], "privacy.dropouts"),
        (["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", "privacy.dropouts=0.5",
          "privacy.colluders=2"], "leaves M = 2 of the 3 clients, not more than privacy.colluders = 2"),
        (["privacy.pool=1", "privacy.secagg=true"], "only private releases"),
    ],
)  # fmt: skip
def test_secagg_settings_are_checked(overrides, why):
    with pytest.raises(ConfigError, match=why):
        load_config(SMOKE, overrides)


@needs_fmnist
def test_a_secagg_run_trains_every_client_against_the_secure_sum(tmp_path, monkeypatch):
    """The server learns only the sum: the engine's secure sum equals the sum of the clients' noisy
    vectors, every client's targets are its statistics, no client reports anything of its own at
    set-up, and no private key is left in the checkpoint."""
    from prismfl import privacy, rundir
    from prismfl.fl import simulate
    from prismfl.fl.client import NOT_REPORTED

    vectors, sums = [], []
    real_of_release, real_result = SecAggClient.of_release.__func__, SecAggServer.result

    def of_release(cls, shared, clip=None, **kw):
        vectors.append(shared)
        return real_of_release(cls, shared, clip, **kw)

    def result(self):
        sums.append(real_result(self))
        return sums[-1]

    monkeypatch.setattr(SecAggClient, "of_release", classmethod(of_release))
    monkeypatch.setattr(SecAggServer, "result", result)
    overrides = ["privacy.epsilon=2", "privacy.pool=1", "privacy.secagg=true", "privacy.colluders=1",
                 "train.rounds=1"]  # fmt: skip
    logs: list[str] = []
    out = simulate.train(load_config(SMOKE, overrides), tmp_path / "run", log=logs.append)
    assert len(vectors) == 3 and len(sums) == 1
    want = sum(v["sums"][0] for v in vectors)
    assert float((sums[0]["sums"][0] - want).abs().max()) < 3 * 2.0**-secagg.FRACTION_BITS
    assert any("secure aggregation: 3 of 3 clients summed (every other client each, 2 of 3 shares rebuild a "
               "secret, at least 3 needed)" in line for line in logs)  # fmt: skip
    assert any("against up to 1 colluding clients" in line for line in logs)
    assert NOT_REPORTED in (out / "partition.txt").read_text()
    ckpt = rundir.load_checkpoint(out)
    pooled = privacy.stats_of_sum(sums[0], 0)
    for c in ckpt["clients"]["clients"]:
        assert c["secagg"] is None
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(c["stats"]["mean"], pooled.mean))
        assert c["privacy"]["client_noise_std"] == pytest.approx(c["privacy"]["noise_std"] / math.sqrt(2))
        assert "min_survivors" not in c["privacy"]  # without privacy.dropouts, what runs wrote before them


def test_cli_privacy_prints_the_secure_sum_shares(run_cli):
    code, out, _ = run_cli("privacy", "--epsilon", "1", "--layers", "1", "--secagg", "4", "--colluders", "0")
    assert code == 0
    z = 3.7306  # noise multiplier at (1, 1e-5), checked against the closed form in test_privacy.py
    share = z * math.sqrt(3) / 2
    assert f"each of 4 clients adds std {share:.4f}" in out and f"std {2 * share:.4f}" in out
    code, _, err = run_cli("privacy", "--epsilon", "1", "--secagg", "4", "--colluders", "4")
    assert code != 0 and "--colluders" in err


def test_james_stein_shrinkage_of_noisy_sums_by_hand_and_by_its_error():
    from prismfl.privacy import shrink_sums

    # one layer of 5 coordinates, n = 2, sigma = 1, clip 1: mean noise tau = 0.5, tau^2 = 0.25
    sums = torch.tensor([2.0, 0.0, 4.0, 2.0, 2.0], dtype=D)  # means [1, 0, 2, 1, 1], average 1, spread 2
    out = shrink_sums({"sums": [sums], "squares": [sums.clone()], "counts": torch.tensor([2.0], dtype=D)}, 1.0, [1.0])
    factor = 1 - (5 - 3) * 0.25 / 2.0  # 0.75
    assert torch.allclose(out["sums"][0] / 2, 1 + factor * (sums / 2 - 1))
    # the squares carry noise sigma C^2 / n as well: the same factor here (clip 1)
    assert torch.allclose(out["squares"][0], out["sums"][0])
    # on many noisy vectors the shrunk means are closer to the truth than the noisy ones
    gen = torch.Generator().manual_seed(0)
    truth = 0.3 * torch.randn(3, 500, generator=gen, dtype=D)  # 3 classes, n = 10 each
    noisy = 10 * truth + 4.0 * torch.randn(3, 500, generator=gen, dtype=D)
    summed = {"sums": [noisy], "squares": [noisy.clone()], "counts": torch.full((3,), 10.0, dtype=D)}
    shrunk = shrink_sums(summed, 4.0, [1.0])["sums"][0] / 10
    assert float(((shrunk - truth) ** 2).sum()) < 0.8 * float(((noisy / 10 - truth) ** 2).sum())
    # classes under the count threshold are left alone
    kept = shrink_sums(summed, 4.0, [1.0], min_count=20.0)["sums"][0]
    assert torch.equal(kept, noisy)


def test_james_stein_toward_a_public_target_by_hand_and_by_its_error():
    from prismfl.privacy import shrink_sums

    # one class row, 4 coordinates, n = 2, sigma = 1, clip 1: tau^2 = 0.25; target t, m - t = [1, 0, 1, 0]
    sums = torch.tensor([[4.0, 2.0, 0.0, 2.0]], dtype=D)  # means [2, 1, 0, 1]
    goal = torch.tensor([[1.0, 1.0, -1.0, 1.0]], dtype=D)
    summed = {"sums": [sums], "squares": [sums.clone()], "counts": torch.tensor([2.0], dtype=D)}
    out = shrink_sums(summed, 1.0, [1.0], target={"means": [goal], "seconds": [goal]})
    factor = 1 - (4 - 2) * 0.25 / 2.0  # 0.75: k = D - 2 toward a fixed target
    assert torch.allclose(out["sums"][0] / 2, goal + factor * (sums / 2 - goal))
    assert torch.allclose(out["squares"][0], out["sums"][0])
    kept: dict = {}
    shrink_sums(summed, 1.0, [1.0], target={"means": [goal], "seconds": [goal]}, kept=kept)
    assert kept == {"means": [0.75], "seconds": [0.75]}
    # noise far above the spread: the release becomes the target itself (times the count)
    loud = shrink_sums(summed, 100.0, [1.0], target={"means": [goal], "seconds": [goal]})
    assert torch.allclose(loud["sums"][0], 2 * goal)
    # a target near the truth beats both the noisy means and the shrinkage toward the layer average
    gen = torch.Generator().manual_seed(1)
    truth = 0.3 * torch.randn(3, 500, generator=gen, dtype=D) + 1.0
    near = truth + 0.05 * torch.randn(3, 500, generator=gen, dtype=D)
    noisy = 10 * truth + 4.0 * torch.randn(3, 500, generator=gen, dtype=D)
    summed = {"sums": [noisy], "squares": [noisy.clone()], "counts": torch.full((3,), 10.0, dtype=D)}
    err = lambda m: float(((m - truth) ** 2).sum())  # noqa: E731
    toward = shrink_sums(summed, 4.0, [1.0], target={"means": [near], "seconds": [near]})["sums"][0] / 10
    flat = shrink_sums(summed, 4.0, [1.0])["sums"][0] / 10
    assert err(toward) < 0.2 * err(flat) < 0.2 * err(noisy / 10)


def test_the_public_target_clips_as_the_release_does_per_class():
    from prismfl.privacy import public_target

    # 2-d features; clip 5: [6, 8] (norm 10) becomes [3, 4]; class 2 holds no image: the overall average
    images = torch.tensor([[6.0, 8.0], [1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1])
    got = public_target(lambda x: [x], images, [5.0], labels=labels, num_classes=3)
    means = torch.tensor([[2.0, 2.0], [0.0, 2.0], [4.0 / 3, 2.0]], dtype=D)
    seconds = torch.tensor([[5.0, 8.0], [0.0, 4.0], [10.0 / 3, 20.0 / 3]], dtype=D)
    assert torch.allclose(got["means"][0], means) and torch.allclose(got["seconds"][0], seconds)
    pooled = public_target(lambda x: [x], images, [5.0])
    assert torch.allclose(pooled["means"][0], means[2]) and torch.allclose(pooled["seconds"][0], seconds[2])


@needs_fmnist
def test_a_secagg_run_with_shrinkage(tmp_path):
    from prismfl.fl import simulate

    logs: list[str] = []
    overrides = ["privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true", "privacy.shrink=true", "train.rounds=1"]
    simulate.train(load_config(SMOKE, overrides), tmp_path / "run", log=logs.append)
    assert any("secure aggregation: 3 of 3 clients summed" in line for line in logs)
    with pytest.raises(ConfigError, match="set privacy.epsilon"):
        load_config(SMOKE, ["privacy.shrink=true"])


PUBLIC_SHRINK = ['loss.features="public"', "privacy.shrink=true", 'privacy.shrink_to="public"']


@needs_fmnist
def test_the_secure_sum_is_shrunk_toward_the_public_statistics(tmp_path, monkeypatch):
    """privacy.shrink_to = "public": the server shrinks the secure sum toward the public hold-out's
    clipped statistics, which the simulator computes as a client would, and every client trains
    against the result."""
    from prismfl import privacy, rundir
    from prismfl.fl import simulate
    from prismfl.fl.client import client_context
    from prismfl.fl.methods import registry

    calls = []
    real = privacy.shrink_sums

    def shrink_sums(summed, sigma, clip, min_count=1.0, target=None, kept=None):
        calls.append((summed, sigma, clip, min_count, target))
        return real(summed, sigma, clip, min_count, target, kept)

    monkeypatch.setattr(privacy, "shrink_sums", shrink_sums)
    overrides = ["privacy.epsilon=2", "privacy.pool=1", "privacy.secagg=true", *PUBLIC_SHRINK, "train.rounds=1"]
    cfg = load_config(SMOKE, overrides)
    logs: list[str] = []
    out = simulate.train(cfg, tmp_path / "run", log=logs.append)
    assert len(calls) == 1  # the server's, on the secure sum (no client shrinks its share of the noise)
    assert any("shrunk toward the public images' statistics; it keeps on average" in str(x) for x in logs)
    summed, sigma, clip, min_count, target = calls[0]
    method = registry.build(cfg)
    ctx = client_context(cfg, method.build_model, "cpu", log=lambda line: None)
    want = privacy.public_target(ctx.extract, ctx.fed.images(ctx.fed.public_idx), clip)
    assert all(torch.equal(a, b) for a, b in zip(target["means"] + target["seconds"], want["means"] + want["seconds"]))
    pooled = privacy.stats_of_sum(real(summed, sigma, clip, min_count, want), 0)
    flat = privacy.stats_of_sum(real(summed, sigma, clip, min_count), 0)
    ckpt = rundir.load_checkpoint(out)
    for c in ckpt["clients"]["clients"]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(c["stats"]["mean"], pooled.mean))
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(pooled.mean, flat.mean))


@needs_fmnist
def test_a_bad_shrinkage_target_stops_the_run_with_one_line(tmp_path, monkeypatch):
    from prismfl.errors import PrismError
    from prismfl.fl import simulate
    from prismfl.fl.client import ClientContext

    real = ClientContext.shrink_target

    def wrong_shape(self):
        t = real(self)
        return {"means": [x[:-1] for x in t["means"]], "seconds": t["seconds"]}

    monkeypatch.setattr(ClientContext, "shrink_target", wrong_shape)
    overrides = ["privacy.epsilon=2", "privacy.pool=1", "privacy.secagg=true", *PUBLIC_SHRINK, "train.rounds=1"]
    with pytest.raises(PrismError, match="privacy.shrink_to = 'public': the shrinkage target's means have shapes"):
        simulate.train(load_config(SMOKE, overrides), tmp_path / "run", log=lambda line: None)


def test_shrink_to_is_checked():
    with pytest.raises(ConfigError, match="did you mean 'public'"):
        load_config(SMOKE, ["privacy.epsilon=1", "privacy.shrink=true", 'privacy.shrink_to="publc"'])
    with pytest.raises(ConfigError, match="set privacy.shrink = true"):
        load_config(SMOKE, ["privacy.epsilon=1", 'privacy.shrink_to="public"', 'loss.features="public"'])
    with pytest.raises(ConfigError, match="needs loss.features = 'public'"):
        load_config(SMOKE, ["privacy.epsilon=1", "privacy.shrink=true", 'privacy.shrink_to="public"'])


@needs_fmnist
def test_a_clients_own_release_is_shrunk_toward_the_public_statistics(tmp_path, monkeypatch):
    """Without secure aggregation each client shrinks its own release, toward the same public target."""
    import prismfl.privacy
    from prismfl import rundir
    from prismfl.fl import simulate
    from prismfl.fl.client import client_context
    from prismfl.fl.methods import registry
    from prismfl.privacy import private_feature_stats

    monkeypatch.setattr(prismfl.privacy.secrets, "randbits", lambda bits: 12345)  # reproducible noise, here only
    cfg = load_config(SMOKE, ["privacy.epsilon=2", *PUBLIC_SHRINK, "train.rounds=1"])
    out = simulate.train(cfg, tmp_path / "run", log=lambda line: None)
    method = registry.build(cfg)
    ctx = client_context(cfg, method.build_model, "cpu", log=lambda line: None)
    images, _ = method.client_data(ctx, 0)

    def release(target):
        return private_feature_stats(ctx.extract, images, ctx.privacy_clip(), 2.0, cfg.privacy.delta, shrink=True,
                                     generator=torch.Generator().manual_seed(12345), target=target).stats  # fmt: skip

    want, flat = release(ctx.shrink_target()), release(None)
    got = rundir.load_checkpoint(out)["clients"]["clients"][0]["stats"]["mean"]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want.mean))
    assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, flat.mean))


def test_a_clients_own_release_is_shrunk_when_asked():
    from prismfl.privacy import private_feature_stats

    images = torch.rand(200, 2000, dtype=torch.float32)
    extract = lambda x: [x]  # noqa: E731
    exact = private_feature_stats(extract, images, [40.0], math.inf, 1e-5).stats
    plain = private_feature_stats(extract, images, [40.0], 0.5, 1e-5, generator=torch.Generator().manual_seed(3))
    shrunk = private_feature_stats(extract, images, [40.0], 0.5, 1e-5, generator=torch.Generator().manual_seed(3),
                                   shrink=True)  # fmt: skip
    err = lambda s: float(((s.mean[0] - exact.mean[0]) ** 2).sum())  # noqa: E731
    assert err(shrunk.stats) < 0.5 * err(plain.stats)
    assert shrunk.epsilon == plain.epsilon  # post-processing: the same guarantee
