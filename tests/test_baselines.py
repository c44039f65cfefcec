"""The baselines in PRISM's harness, on configs/smoke.toml: what they write, what they count, resume."""

from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import modelfile, rundir
from prismfl.capabilities import DENSE_MODEL, MASK_MODEL
from prismfl.config import load_config
from prismfl.fl import simulate, wire

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
pytestmark = needs_fmnist
QUIET = {"log": lambda *_: None}


def run(method: str, out: Path, rounds: int = 2, resume: bool = False) -> Path:
    cfg = load_config(SMOKE, [f'train.method="{method}"', f"train.rounds={rounds}", "train.sample_every=0"])
    return simulate.train(cfg, out, resume=resume, **QUIET)


def test_fedavg_sends_float32_weights_and_saves_a_dense_model(tmp_path):
    out = run("fedavg", tmp_path / "fedavg")
    n = 16 * 64 + 64 * 128 + 128 * 784  # the smoke MLP's weights
    for r in rundir.read_metrics(out):
        assert r["upload_bytes"] == len(r["clients"]) * (wire.HEADER.size + 4 * n)
        assert r["download_bytes"] == r["upload_bytes"] and r["lambda"] is None
        assert r["bits_per_param"] > 32  # the header on top of 32 bits per weight
    net, meta = modelfile.load_dense(out / DENSE_MODEL)
    assert meta["method"] == "fedavg" and meta["dataset"] == "fashion-mnist"
    assert modelfile.sample(net, 4).shape == (4, 1, 28, 28)
    assert (out / "report.md").is_file() and (out / "samples.png").is_file()
    # the report counts both ways: dense FedAvg's traffic is itself (plus a 36-byte header a message)
    total = sum(r["upload_bytes"] + r["download_bytes"] for r in rundir.read_metrics(out))
    assert f"Traffic up and down: {total / 1e6:.2f} MB (1.000 x dense FedAvg's" in (out / "report.md").read_text()


def test_local_writes_one_model_per_client_and_sends_nothing(tmp_path):
    out = run("local", tmp_path / "local")
    assert all(r["upload_bytes"] == 0 == r["download_bytes"] for r in rundir.read_metrics(out))
    models = [modelfile.load(out / "models" / f"client-{k}.prism") for k in range(3)]
    assert [m.info["client"] for m in models] == [0, 1, 2]
    assert not torch.equal(models[0].mask, models[1].mask)  # trained apart


def test_a_conditional_local_client_draws_its_own_classes_and_the_best_one_heads_its_evaluation(tmp_path):
    """The `local` reference for a conditional model: each client's model samples the classes it holds, in
    their shares; evaluated, every client's model is scored and the best one (least domain FID) is the row."""
    from prismfl.eval.evaluate import evaluate
    from test_run import _write_small_fmnist

    cfg = load_config(SMOKE, ['train.method="local"', "train.rounds=1", "train.sample_every=0",
                              "model.conditional=true", 'model.arch="mlp-up"'])  # fmt: skip
    out = simulate.train(cfg, tmp_path / "local", **QUIET)
    table = [line.split()[1:-1] for line in (out / "partition.txt").read_text().splitlines()[1:]]
    for k, row in enumerate(table):
        counts = torch.tensor([float(c) for c in row], dtype=torch.float64)
        shares = modelfile.load(out / "models" / f"client-{k}.prism").class_shares
        assert torch.allclose(torch.tensor(shares, dtype=torch.float64), counts / counts.sum())
    result = evaluate(out, n=200, root=str(_write_small_fmnist(tmp_path, 1200, 300)), synthetic=0)
    fids = [r["domain_fid"] for r in result["per_client"]]
    assert result["best_client"] == fids.index(min(fids)) and result["domain_fid"] == min(fids)
    assert result["mean_domain_fid"] == pytest.approx(sum(fids) / 3)


def test_central_takes_as_many_steps_as_the_federation(tmp_path):
    out = run("central", tmp_path / "central")
    state = rundir.load_checkpoint(out)
    (pooled,) = state["clients"]["clients"]  # one pooled client, holding every client's images
    assert pooled["k"] == 0 and pooled["stats"]["count"] == 3000
    assert modelfile.load(out / MASK_MODEL).info["method"] == "central"


def test_public_trains_on_the_public_hold_out_only(tmp_path):
    """The reference that reads no private data: one pooled client holding the public images, which no
    client holds; a config with privacy or without a hold-out is refused."""
    from prismfl.config import ConfigError
    from prismfl.data import federation
    from prismfl.fl.methods.registry import build

    public = ['train.method="public"', 'loss.features="public"', "train.rounds=1", "train.sample_every=0"]
    cfg = load_config(SMOKE, public)
    out = simulate.train(cfg, tmp_path / "public", **QUIET)
    (pooled,) = rundir.load_checkpoint(out)["clients"]["clients"]
    assert pooled["k"] == 0 and pooled["stats"]["count"] == 500  # smoke.toml's partition.public_holdout
    assert modelfile.load(out / MASK_MODEL).info["method"] == "public"
    fed = federation.prepare_federation(cfg)
    ctx = type("Ctx", (), {"fed": fed})()
    idx = build(cfg).client_indices(ctx, 0)
    assert len(idx) == 500 and set(idx.tolist()) == set(fed.public_idx.tolist())
    assert not set(idx.tolist()) & set(int(i) for part in fed.parts for i in part)
    with pytest.raises(ConfigError, match="nothing to make private"):
        load_config(SMOKE, [*public, "privacy.epsilon=1.0"])
    with pytest.raises(
        ConfigError, match="loss.features = 'public' trains on held-out public images: set partition.public_holdout > 0"
    ):  # (the loss's rule, checked before the method's)
        load_config(SMOKE, [*public, "partition.public_holdout=0"])
    with pytest.raises(ConfigError, match="loss.features = 'public' and partition.public_holdout > 0"):
        load_config(SMOKE, ['train.method="public"'])  # the random feature net: no hold-out


@pytest.mark.parametrize("method", ["fedavg", "local", "central"])
def test_resume_reaches_the_same_state(method, tmp_path, monkeypatch):
    from test_run import assert_same_run, kill_during

    whole = run(method, tmp_path / "whole", rounds=3)
    restore = kill_during(monkeypatch, 2 * (1 if method == "central" else 3) + 1)  # killed in round 3
    with pytest.raises(KeyboardInterrupt):
        run(method, tmp_path / "killed", rounds=3)
    assert rundir.load_checkpoint(tmp_path / "killed")["round"] == 2
    restore()
    run(method, tmp_path / "killed", rounds=3, resume=True)
    assert_same_run(whole, tmp_path / "killed")


@pytest.mark.parametrize("method", ["fedavg", "local", "central"])
def test_every_method_writes_round_grids(method, tmp_path):
    cfg = load_config(SMOKE, [f'train.method="{method}"', "train.rounds=2", "train.sample_every=1"])
    out = simulate.train(cfg, tmp_path / method, **QUIET)
    assert (out / "samples" / "round-0001.png").is_file() and (out / "samples.png").is_file()
