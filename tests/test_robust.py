"""Hostile clients and lost uploads: the simulator's faults, and robust aggregation around a method."""

from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.config import load_config
from prismfl.errors import ConfigError
from prismfl.fl import aggregate, faults, robust, simulate, wire

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
TABLE = wire.layer_table_hash([("w", (2000,))])


def honest_masks(m: int, n: int = 2000, flip: float = 0.1) -> list[torch.Tensor]:
    base = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    return [base ^ (torch.rand(n, generator=torch.Generator().manual_seed(i + 1)) < flip) for i in range(m)]


def test_trimmed_counts_hand_computed():
    counts = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    trimmed, m = aggregate.trim_counts(counts, 5, 1)  # 5 bits per weight, the top and bottom one dropped
    assert m == 3 and trimmed.tolist() == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="cannot trim 2"):
        aggregate.trim_counts(counts, 4, 2)


def test_distances_hand_computed():
    a, b = torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    assert robust.distances([a, b]).tolist() == [[0.0, 0.5], [0.5, 0.0]]
    x, y = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 0.0])
    assert robust.distances([x, y])[0, 1] == 5.0


@pytest.mark.parametrize("attack", ["ones", "zeros", "invert", "random"])
def test_the_distance_rule_finds_hostile_masks_and_only_them(attack):
    masks = honest_masks(8)
    coin = torch.rand(2000, generator=torch.Generator().manual_seed(9)) < 0.5
    bad = {"ones": torch.ones(2000, dtype=torch.bool), "zeros": torch.zeros(2000, dtype=torch.bool),
           "invert": ~masks[0], "random": coin}[attack]  # fmt: skip
    found = robust.outliers([*masks, bad, bad ^ (torch.arange(2000) == 0)], tolerance=3.0)
    assert sorted(i for i, _, _ in found) == [8, 9]
    assert robust.outliers(masks, tolerance=3.0) == []  # no attack: nothing left out


def test_the_distance_rule_never_leaves_out_a_majority():
    masks = [torch.rand(2000, generator=torch.Generator().manual_seed(i)) < 0.5 for i in range(5)]
    assert len(robust.outliers(masks, tolerance=0.01)) <= 2


def test_fault_draws_are_seeded_and_sized():
    cfg = load_config(SMOKE, ["partition.num_clients=10", "faults.byzantine=0.2", "faults.dropout=0.5"])
    fate = faults.draw(cfg, 3, list(range(10)))
    assert fate == faults.draw(cfg, 3, list(range(10))) and fate != faults.draw(cfg, 4, list(range(10)))
    assert sum(v == "byzantine" for v in fate.values()) == 2
    assert 0 < sum(v == "dropout" for v in fate.values()) < 8


@pytest.mark.parametrize("attack", ["ones", "zeros", "invert", "random", "collude", "replay"])
def test_forged_uploads_are_well_formed_and_say_what_they_claim(attack):
    cfg = load_config(SMOKE, [f'faults.attack="{attack}"'])
    scores = torch.randn(2000, generator=torch.Generator().manual_seed(5))
    honest_mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(6))
    honest = wire.encode_upload(honest_mask, scores, round_=2, table_hash=TABLE, client=1)
    earlier = wire.encode_upload(honest_mask, scores, round_=1, table_hash=TABLE, client=1)
    forged = faults.forge(cfg, honest=honest, replica=scores, rnd=2, k=1, table_hash=TABLE, num_weights=2000,
                          earlier=earlier)  # fmt: skip
    if attack == "replay":
        assert forged == earlier
        with pytest.raises(wire.UnexpectedMessage, match="round 2, got one for round 1"):
            wire.decode_upload(forged, scores, round_=2, table_hash=TABLE, client=1)
        return
    mask = wire.decode_upload(forged, scores, round_=2, table_hash=TABLE, client=1)
    expected = {"ones": lambda: 0.99 < mask.float().mean() < 1, "zeros": lambda: 0 < mask.float().mean() < 0.01,
                "invert": lambda: torch.equal(mask, ~honest_mask),
                "random": lambda: 0.45 < mask.float().mean() < 0.55,
                "collude": lambda: 0 < (mask != (scores <= 0)).sum() < 20}[attack]  # fmt: skip
    assert expected()


def test_trimmed_rule_needs_prism():
    with pytest.raises(ConfigError, match="trimmed"):
        load_config(SMOKE, ['train.method="fedavg"', 'robust.rule="trimmed"'])


@needs_fmnist
def test_hostile_clients_are_left_out_and_lost_uploads_do_not_stop_the_run(tmp_path):
    cfg = load_config(SMOKE, ["faults.byzantine=0.34", 'faults.attack="ones"', 'robust.rule="distance"',
                              "train.rounds=2", "train.sample_every=0"])  # fmt: skip
    records = rundir.read_metrics(simulate.train(cfg, tmp_path / "b", log=lambda *_: None))
    assert all(len(r["rejected"]) == 1 and "bits per weight" in r["rejected"][0]["why"] for r in records)
    cfg = load_config(SMOKE, ["faults.dropout=0.3", "train.rounds=3", "train.sample_every=0"])
    records = rundir.read_metrics(simulate.train(cfg, tmp_path / "d", log=lambda *_: None))
    lost = [f["client"] for r in records for f in r.get("failures", [])]
    assert lost and all("simulated fault" in f["error"] for r in records for f in r.get("failures", []))
    assert all(len(r["clients"]) + len(r.get("failures", [])) == 3 for r in records)
    assert (tmp_path / "d" / "model.prism").is_file()


@pytest.mark.parametrize("attack", ["ones", "zeros", "invert", "random", "collude"])
def test_masks_far_from_the_global_draw_are_left_out(attack):
    """Honest masks drawn from probabilities near the global ones, some of them far apart from each
    other (non-IID): the Hamming distance between them is as large as an attack's, their cost under
    the global probabilities is not."""
    gen = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(4000, generator=gen)
    honest = [aggregate.sample_mask(scores + 0.5 * torch.randn(4000, generator=gen), gen) for _ in range(8)]
    coin = torch.rand(4000, generator=gen) < 0.5
    bad = {"ones": torch.ones(4000, dtype=torch.bool), "zeros": torch.zeros(4000, dtype=torch.bool),
           "invert": ~honest[0], "random": coin, "collude": scores <= 0}[attack]  # fmt: skip
    found = robust.outliers([*honest, bad, bad ^ (torch.arange(4000) == 7)], 3.0, scores)
    assert sorted(i for i, _, _ in found) == [8, 9]
    assert robust.outliers(honest, 3.0, scores) == []
