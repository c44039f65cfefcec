"""End to end on real FashionMNIST with configs/smoke.toml: training, export, sampling, resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import modelfile, rundir
from prismfl.config import load_config
from prismfl.fl import simulate, wire

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    simulate.train(load_config(SMOKE), out, log=lambda *_: None)
    return out


def test_run_directory_contents(smoke_run):
    for name in ["config.toml", "partition.txt", "metrics.jsonl", "checkpoint.safetensors", "model.prism",
                 "samples.png", "curves.png", "samples/round-0002.png"]:  # fmt: skip
        assert (smoke_run / name).is_file(), name
    table = (smoke_run / "partition.txt").read_text().splitlines()
    assert len(table) == 1 + 3
    assert sum(int(line.split()[-1]) for line in table[1:]) == 3000  # random features: no public hold-out


def test_metrics_and_loss_falls(smoke_run):
    records = rundir.read_metrics(smoke_run)
    assert [r["round"] for r in records] == [1, 2, 3]
    cfg = load_config(SMOKE)
    n = modelfile.load(smoke_run / "model.prism").mask.numel()
    for r in records:
        for key in ["round", "loss", "lambda", "upload_bytes", "bits_per_param", "seconds"]:
            assert key in r
        # uploads are entropy-coded unless packing (32-byte header + ceil(N/8)) is smaller
        assert 0 < r["upload_bytes"] <= cfg.partition.num_clients * (wire.HEADER.size + math.ceil(n / 8))
        assert r["bits_per_param"] == pytest.approx(8 * r["upload_bytes"] / (n * cfg.partition.num_clients))
        assert r["entropy_bound_bits_per_param"] <= r["bits_per_param"] + 1e-9
        assert 0 < r["lambda"] < 1
    assert records[-1]["loss"] < records[0]["start_loss"]
    assert records[-1]["start_loss"] < records[0]["start_loss"]


def test_model_file_is_packed_mask_plus_small_header(smoke_run):
    data = (smoke_run / "model.prism").read_bytes()
    n = modelfile.load(smoke_run / "model.prism").mask.numel()
    assert math.ceil(n / 8) < len(data) < math.ceil(n / 8) + 4096


def kill_during(monkeypatch, call: int):
    """Make the `call`-th local training raise KeyboardInterrupt (a kill), counting from 1."""
    from prismfl.fl import client

    real, calls = client.local_train, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "local_train", dying)
    return lambda: monkeypatch.setattr(client, "local_train", real)


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same state: server, every client's state, records (bar timings)."""
    import torch.utils._pytree as pytree

    sa, sb = rundir.load_checkpoint(a), rundir.load_checkpoint(b)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    la, lb = pytree.tree_leaves({k: sa[k] for k in ("server", "clients")}), \
        pytree.tree_leaves({k: sb[k] for k in ("server", "clients")})  # fmt: skip
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert strip(sa["records"]) == strip(sb["records"])
    assert strip(rundir.read_metrics(a)) == strip(rundir.read_metrics(b)) == strip(sa["records"])


def test_resume_reaches_the_same_state(smoke_run, tmp_path, monkeypatch):
    cfg = load_config(SMOKE)
    out = tmp_path / "killed"
    restore = kill_during(monkeypatch, 2 * 3 + 2)  # killed during round 3, after its first client
    with pytest.raises(KeyboardInterrupt):
        simulate.train(cfg, out, log=lambda *_: None)
    assert rundir.load_checkpoint(out)["round"] == 2
    restore()
    simulate.train(cfg, out, resume=True, log=lambda *_: None)
    assert_same_run(smoke_run, out)
    assert (smoke_run / "model.prism").read_bytes() == (out / "model.prism").read_bytes()


def test_a_kill_in_the_first_round_can_be_resumed_or_restarted(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, ["train.rounds=1"])
    restore = kill_during(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        simulate.train(cfg, tmp_path / "a", log=lambda *_: None)
    restore()
    assert not (tmp_path / "a" / rundir.CHECKPOINT).exists() and (tmp_path / "a" / rundir.CONFIG).exists()
    simulate.train(cfg, tmp_path / "a", resume=True, log=lambda *_: None)
    assert [r["round"] for r in rundir.read_metrics(tmp_path / "a")] == [1]
    restore = kill_during(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        simulate.train(cfg, tmp_path / "b", log=lambda *_: None)
    restore()
    simulate.train(cfg, tmp_path / "b", log=lambda *_: None)  # or started again, without --resume
    assert (tmp_path / "a" / "model.prism").read_bytes() == (tmp_path / "b" / "model.prism").read_bytes()


def test_a_torn_metrics_line_is_rewritten_from_the_checkpoint_on_resume(smoke_run, tmp_path):
    import shutil

    out = tmp_path / "torn"
    shutil.copytree(smoke_run, out)
    with open(out / rundir.METRICS, "a") as f:
        f.write('{"round": 4, "lo')  # a kill in the middle of appending a record
    assert len(rundir.read_metrics(out)) == 3
    simulate.train(load_config(SMOKE), out, resume=True, log=lambda *_: None)
    assert (out / rundir.METRICS).read_text().count("\n") == 3 and rundir.read_metrics(out) == \
        rundir.load_checkpoint(out)["records"]  # fmt: skip


def test_packed_uploads_cost_exactly_n_over_8(tmp_path):
    cfg = load_config(SMOKE, ["train.rounds=1", "train.upload_coder=packed", "train.broadcast=float32"])
    simulate.train(cfg, tmp_path / "p", log=lambda *_: None)
    (r,) = rundir.read_metrics(tmp_path / "p")
    n = modelfile.load(tmp_path / "p" / "model.prism").mask.numel()
    assert r["upload_bytes"] == 3 * (wire.HEADER.size + math.ceil(n / 8))
    assert r["download_bytes"] == 3 * (wire.HEADER.size + 4 * n)


def test_same_seed_same_model_other_seed_differs(smoke_run, tmp_path):
    cfg = load_config(SMOKE, ["seed=1", "train.rounds=1"])
    simulate.train(cfg, tmp_path / "s1", log=lambda *_: None)
    assert (tmp_path / "s1" / "model.prism").read_bytes() != (smoke_run / "model.prism").read_bytes()


def test_refuses_to_overwrite_a_run(smoke_run):
    from prismfl.errors import PrismError

    with pytest.raises(PrismError, match="not empty"):
        simulate.train(load_config(SMOKE), smoke_run, log=lambda *_: None)


def test_cli_sample_same_from_run_and_file(smoke_run, tmp_path, run_cli):
    assert run_cli("export", str(smoke_run), "--out", str(tmp_path / "m.prism"))[0] == 0
    assert (tmp_path / "m.prism").read_bytes() == (smoke_run / "model.prism").read_bytes()
    run_cli("sample", str(smoke_run), "--n", "16", "--seed", "3", "--out", str(tmp_path / "a.png"))
    run_cli("sample", str(tmp_path / "m.prism"), "--n", "16", "--seed", "3", "--out", str(tmp_path / "b.png"))
    run_cli("sample", str(tmp_path / "m.prism"), "--n", "16", "--seed", "4", "--out", str(tmp_path / "c.png"))
    a, b, c = ((tmp_path / f"{x}.png").read_bytes() for x in "abc")
    assert a == b and a != c


def test_cli_info(smoke_run, run_cli):
    code, out, _ = run_cli("info", str(smoke_run / "model.prism"))
    assert code == 0 and "total maskable" in out and "fc1" in out
    assert json.loads(out.split("info: ", 1)[1])["dataset"] == "fashion-mnist"


def test_privacy_inf_is_the_non_private_run(smoke_run, tmp_path):
    simulate.train(load_config(SMOKE, ["privacy.epsilon=inf"]), tmp_path / "inf", log=lambda *_: None)
    assert (tmp_path / "inf" / "model.prism").read_bytes() == (smoke_run / "model.prism").read_bytes()


def test_dp_run_trains_on_noisy_statistics_and_reports_epsilon(smoke_run, tmp_path):
    from prismfl.privacy import noise_multiplier

    cfg = load_config(SMOKE, ["privacy.epsilon=4.0", "train.rounds=1"])
    simulate.train(cfg, tmp_path / "dp", log=lambda *_: None)
    (record,) = rundir.read_metrics(tmp_path / "dp")
    assert record["epsilon"] == pytest.approx(4.0)
    assert modelfile.load(tmp_path / "dp" / "model.prism").info["privacy"]["epsilon"] == pytest.approx(4.0)
    released = rundir.load_checkpoint(tmp_path / "dp")["clients"]["clients"]
    exact = rundir.load_checkpoint(smoke_run)["clients"]["clients"]
    for noisy, clean in zip(released, exact):
        summary = noisy["privacy"]
        assert clean["privacy"] is None and summary["noise_multiplier"] == pytest.approx(noise_multiplier(4.0, 1e-5))
        gap = (
            (noisy["stats"]["mean"][0] - clean["stats"]["mean"][0]).abs().mean().item()
        )  # pixels: clipping barely acts
        assert gap > 1e-4  # noise is there ...
        assert gap < 0.5  # ... of a sane size (noise std ~0.1 per pixel here, plus the bias of clipping)
    assert (tmp_path / "dp" / "model.prism").read_bytes() != (smoke_run / "model.prism").read_bytes()


def _write_small_fmnist(root, n_train: int, n_test: int):
    """A small FashionMNIST in IDX format (real images): fast reference statistics and train on synthetic."""
    from prismfl.data.idx import write_idx
    from prismfl.data.sources import load_split

    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        s = load_split("fashion-mnist", split)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", s.images[:n, 0])
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", s.labels[:n].astype("uint8"))
    return root


@pytest.fixture(scope="module")
def small_fmnist(tmp_path_factory):
    return _write_small_fmnist(tmp_path_factory.mktemp("fm-small"), 1200, 300)


def test_cli_evaluate(smoke_run, small_fmnist, tmp_path, run_cli):
    code, out, err = run_cli("evaluate", str(smoke_run), "--n", "200", "--data-root", str(small_fmnist),
                             "--out", str(tmp_path / "q.json"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "q.json").read_text())
    assert r["domain_fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1
    assert sum(r["class_histogram"]) == 200 and len(r["class_names"]) == 10
    assert "one fixed exported model" in r["protocol"]["model"] and "not Inception" in r["protocol"]["domain_fid"]
    assert "domain FID" in out and "precision" in out
    code, _, _ = run_cli("evaluate", str(smoke_run), "--n", "200", "--data-root", str(small_fmnist), "--ensemble",
                         "--out", str(tmp_path / "e.json"))  # fmt: skip
    assert code == 0 and "ensemble" in json.loads((tmp_path / "e.json").read_text())["protocol"]["model"]


def test_cli_evaluate_with_inception_weights(smoke_run, tmp_path, run_cli):
    from prismfl.eval.inception import InceptionV3

    tiny = _write_small_fmnist(tmp_path, 600, 12)  # Inception costs ~0.1 s per image on a CPU
    torch.manual_seed(0)
    torch.save(InceptionV3("pytorch-fid").state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    code, _, err = run_cli("evaluate", str(smoke_run / "model.prism"), "--n", "8", "--data-root", str(tiny),
                           "--inception", str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"),
                           "--out", str(tmp_path / "i.json"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "i.json").read_text())
    assert r["inception_fid"] >= 0 and "pool3" in r["protocol"]["inception_fid"]


def test_final_mask_is_the_mode():
    from prismfl.fl.methods.base import masked_final_model

    cfg = load_config(SMOKE)
    scores = torch.tensor([-3.0, -0.1, 0.0, 0.1, 3.0] * 200)
    final = masked_final_model(cfg, cfg.arch_spec(), {"scores": scores}, 1, {}).mask
    assert torch.equal(final, scores > 0)  # p > 1/2 exactly; p = 1/2 dropped


def test_an_old_pickle_checkpoint_is_refused_and_never_loaded(tmp_path, run_cli):
    """A checkpoint.pt (prismfl < 0.2, a pickle) whose unpickling would run code: nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    run = tmp_path / "old-run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"config": {}, "x": Evil()}))
    for args in (["info", str(run)], ["sample", str(run), "--out", str(tmp_path / "s.png")],
                 ["export", str(run), "--out", str(tmp_path / "m.prism")], ["evaluate", str(run)],
                 ["train", "--config", str(SMOKE), "--out", str(run), "--resume"]):  # fmt: skip
        code, _, err = run_cli(*args)
        assert code == 2 and "older prismfl" in err and err.count("\n") == 1, (args, err)
    assert not marker.exists()


def test_a_run_in_a_log_prints_one_line_per_round_and_no_bars(tmp_path, run_cli):
    code, _, err = run_cli("train", "--config", str(SMOKE), "--out", str(tmp_path / "r"), "--set", "train.rounds=2")
    assert code == 0, err
    rounds = [line for line in err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1/2", "round 2/2"]
    assert "loss" in rounds[0] and "bytes up" in rounds[0] and "\r" not in err  # stderr is no terminal here
    code, _, err = run_cli("train", "--config", str(SMOKE), "--out", str(tmp_path / "q"), "--set", "train.rounds=1",
                           "--quiet")  # fmt: skip
    assert code == 0 and "round 1/1" not in err


def test_kill_9_then_resume_is_bit_exact(tmp_path):
    """`prismfl train` killed with SIGKILL as soon as a round is checkpointed, then --resume: the same
    state and records as a run never interrupted (separate processes, one thread each)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--config", str(SMOKE), "--set", "train.rounds=4", "--set", "train.local_steps=40", "-q"]

    def train(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "prismfl.cli", "train", "--out", str(out), *args, *extra],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    whole = train(tmp_path / "whole")
    killed = train(tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not rundir.read_metrics(tmp_path / "killed") and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    done = len(rundir.read_metrics(tmp_path / "killed"))
    assert 1 <= done < 4, "the kill came after the run ended"
    resumed = train(tmp_path / "killed", "--resume")
    for p in (whole, resumed):
        assert p.wait(300) == 0, p.stderr.read().decode()[-2000:]
    assert_same_run(tmp_path / "whole", tmp_path / "killed")
    assert (tmp_path / "whole" / "model.prism").read_bytes() == (tmp_path / "killed" / "model.prism").read_bytes()


@pytest.mark.parametrize("reference", ["real", "pca-gaussian"])
def test_cli_evaluate_reference_rows(reference, small_fmnist, tmp_path, run_cli):
    code, out, err = run_cli("evaluate", reference, "--n", "200", "--data-root", str(small_fmnist),
                             "--out", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["method"] == reference and sum(r["class_histogram"]) == 200
    assert r["protocol_version"] == "prismfl-domain-v3" and "prismfl-domain-v3" in out
    assert (
        "shipped with prismfl (eval-fashion-mnist-v3.safetensors), test accuracy 0.9311" in r["protocol"]["classifier"]
    )
    assert not (tmp_path / "evaluation.json").exists()


def test_cli_evaluate_reference_unknown_dataset(run_cli):
    code, _, err = run_cli("evaluate", "pca-gaussian", "--dataset", "imagenet")
    assert code != 0 and "unknown dataset 'imagenet'" in err


def test_cli_evaluate_missing_source_names_the_references(run_cli):
    code, _, err = run_cli("evaluate", "pca-gausian")
    assert code == 2 and "model file not found: pca-gausian" in err and "real, pca-gaussian" in err


def test_issue12_levers_run_together_under_dp_with_one_more_released_layer_each(tmp_path):
    import math

    levers = ["loss.class_term=true", "model.arch=mlp-up"]
    cfg = load_config(SMOKE, ["privacy.epsilon=4.0", "train.rounds=1", *levers])
    simulate.train(cfg, tmp_path / "dp", log=lambda *_: None)
    released = rundir.load_checkpoint(tmp_path / "dp")["clients"]["clients"]
    summary = next(c["privacy"] for c in released if c["privacy"] is not None)
    assert summary["sensitivity"] == pytest.approx(math.sqrt(2 * 8 + 1))  # pixels, 6 ReLUs, class
    assert modelfile.load(tmp_path / "dp" / "model.prism").spec.name == "mlp-up"
