import torch

from prismfl.fl import protocol, server, wire

TABLE = wire.layer_table_hash([("w", (300,))])


def test_clients_rebuild_the_server_state_every_round():
    n = 300
    scores = torch.randn(n, generator=torch.Generator().manual_seed(0))
    replica = scores.clone()  # what a client that follows every broadcast holds
    for rnd in range(1, 6):
        uploads = [
            protocol.client_upload(
                server.sample_mask(scores + k, torch.Generator().manual_seed(10 * rnd + k)),
                scores,
                round_=rnd,
                table_hash=TABLE,
                coder="auto",
            )  # fmt: skip
            for k in range(3)
        ]
        out = protocol.server_round(scores, uploads, round_=rnd, table_hash=TABLE, smoothing=0.01, mada=rnd % 2 == 0,
                                    rng=torch.Generator().manual_seed(rnd))  # fmt: skip
        replica = protocol.apply_broadcast(replica, out.broadcast, round_=rnd, table_hash=TABLE)
        assert torch.equal(replica, out.scores)
        assert (out.lam is None) == (rnd % 2 == 1)
        scores = out.scores


def test_server_round_matches_the_plain_functions():
    n = 500
    scores = torch.randn(n, generator=torch.Generator().manual_seed(1))
    masks = [server.sample_mask(scores, torch.Generator().manual_seed(s)) for s in range(4)]
    uploads = [protocol.client_upload(m, scores, round_=1, table_hash=TABLE, coder="range") for m in masks]
    out = protocol.server_round(scores, uploads, round_=1, table_hash=TABLE, smoothing=0.01, mada=True,
                                rng=torch.Generator().manual_seed(7))  # fmt: skip
    expected, lam = server.mada_update(scores, server.aggregate_masks(masks, 0.01), torch.Generator().manual_seed(7))
    assert torch.equal(out.scores, expected) and out.lam == lam
    assert all(torch.equal(a, b) for a, b in zip(out.masks, masks))
    bound = sum(protocol.cross_entropy_bits(m, scores) for m in masks)
    assert out.entropy_bound_bits == bound and sum(len(u) for u in uploads) * 8 >= bound
    decoded = protocol.aggregate_round(scores, masks, round_=1, table_hash=TABLE, smoothing=0.01, mada=True,
                                       rng=torch.Generator().manual_seed(7))  # fmt: skip
    assert torch.equal(decoded.scores, out.scores) and decoded.broadcast == out.broadcast


def test_cross_entropy_bits_hand_computed():
    scores = torch.tensor([0.0, 0.0, float(torch.log(torch.tensor(3.0)))])  # p = 0.5, 0.5, 0.75
    mask = torch.tensor([True, False, False])
    # 1 + 1 + -log2(0.25) = 4 bits
    assert abs(protocol.cross_entropy_bits(mask, scores) - 4.0) < 1e-6  # float32 ln 3


def test_catch_up_bytes():
    sizes = {1: 10, 2: 20, 3: 30}
    assert protocol.catch_up_bytes(3, 3, sizes, 1000) == 0
    assert protocol.catch_up_bytes(1, 3, sizes, 1000) == 50
    assert protocol.catch_up_bytes(0, 3, sizes, 40) == 40  # the full state is cheaper
    assert protocol.catch_up_rounds(1, 3, sizes, 1000) == [2, 3]
    assert protocol.catch_up_rounds(0, 3, sizes, 60) == [1, 2, 3]  # a tie sends the deltas
    assert protocol.catch_up_rounds(0, 3, sizes, 40) is None
