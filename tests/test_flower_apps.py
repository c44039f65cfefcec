"""The Flower apps in one process: a Grid that hands each message to the ClientApp at once.

No Flower process starts here (those tests are in test_flower_engine.py, marked slow). This checks
the adapters themselves: same global scores as the simulator after every round, bit for bit; the
same run directory; faults (a reply that fails to decode, a client that never answers, too few
replies); and the mapping of Flower's run config and node config onto prismfl's config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra prismfl[flower]")
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from conftest import full_state_bytes, needs_fmnist
from prismfl import modelfile, rundir, secagg
from prismfl.capabilities import DENSE_MODEL
from prismfl.config import load_config
from prismfl.data import federation
from prismfl.errors import ConfigError, PrismError
from prismfl.fl import engine, simulate, wire
from prismfl.flower import settings
from prismfl.flower.client_app import make_client_app
from prismfl.flower.payload import from_array, to_array
from prismfl.flower.server_app import run_federation

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
TIMINGS = ("seconds", "client_seconds")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Simulator and apps compute with the same (one) thread here; two threads on a loaded 2-core
    machine are several times slower, and sum floats in another order (docs/deploy.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps messages with the identity of the running task; here there is none, so make one up."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class LocalGrid(Grid):
    """Every node's ClientApp runs in this process when a message is pushed; a message for which
    `silent(node, group)` is true is never answered (a dead node)."""

    def __init__(self, client_app, node_configs: dict[int, dict], silent=lambda node, group: False):
        self.app, self.silent = client_app, silent
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
                         for node, cfg in node_configs.items()}  # fmt: skip
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = f"m{len(self.sent)}"
            self.sent.append(m)
            ids.append(mid)
            node = m.metadata.dst_node_id
            if self.silent(node, m.metadata.group_id):
                continue
            try:
                self.replies[mid] = self.app(m, self.contexts[node])
            except Exception as exc:  # what Flower's runtime does with a ClientApp exception
                self.replies[mid] = Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=m)
        return ids

    def pull_messages(self, message_ids):
        got = [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]
        self.received += got
        return got

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def nodes_for(k: int, num_partitions: int | None = None) -> dict[int, dict]:
    """Node ids in another order than partition ids, so the server must map one onto the other."""
    return {100 + (k - 1 - i): {"partition-id": i, "num-partitions": num_partitions or k} for i in range(k)}


def server(run_config: dict) -> settings.ServerSettings:
    return settings.server_settings({"config-file": str(SMOKE), "reply-timeout": 5.0, "connect-timeout": 5.0,
                                     **run_config})  # fmt: skip


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def simulate_with_states(cfg, out):
    """The in-process simulator, with the method's global state after every round."""
    per_round = []
    engine.run(cfg, out, simulate.InProcess(cfg), log=lambda *_: None,
               on_round=lambda rnd, state: per_round.append({k: v.clone() for k, v in state.items()
                                                              if isinstance(v, torch.Tensor)}))  # fmt: skip
    return out, per_round


@pytest.fixture(scope="module")
def simulator_run(tmp_path_factory):
    return simulate_with_states(load_config(SMOKE), tmp_path_factory.mktemp("sim") / "run")


def bytes_on_the_wire(grid) -> tuple[dict, dict]:
    """Bytes of the uploads and of the downlinks that travelled, by round."""
    ups, downs = {}, {}
    for m in grid.received:
        if m.metadata.message_type == "train":
            ups[m.metadata.group_id] = ups.get(m.metadata.group_id, 0) + len(from_array(m.content["upload"]["000"]))
    for m in grid.sent:
        if m.metadata.message_type == "train" and "broadcast" in m.content:
            size = sum(len(from_array(a)) for a in m.content["broadcast"].values())
            downs[m.metadata.group_id] = downs.get(m.metadata.group_id, 0) + size
    return ups, downs


def flower_with_states(run_config: dict, grid) -> list[dict]:
    per_round = []
    run_federation(grid, server(run_config), on_round=lambda rnd, state: per_round.append(
        {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}))  # fmt: skip
    return per_round


@needs_fmnist
def test_flower_apps_match_the_simulator_bit_for_bit(simulator_run, tmp_path):
    sim_out, sim_states = simulator_run
    out = tmp_path / "flower"
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(out)}, grid)

    assert len(per_round) == len(sim_states) == 3
    for a, b in zip(per_round, sim_states):
        assert torch.equal(a["scores"], b["scores"])
    assert strip(rundir.read_metrics(out)) == strip(rundir.read_metrics(sim_out))
    for name in ["model.prism", "config.toml", "partition.txt"]:
        assert (out / name).read_bytes() == (sim_out / name).read_bytes(), name
    for name in ["samples.png", "curves.png", "samples/round-0002.png", rundir.CHECKPOINT]:
        assert (out / name).is_file(), name
    ckpt = rundir.load_checkpoint(out)
    assert torch.equal(ckpt["server"]["scores"], sim_states[-1]["scores"]) and ckpt["clients"] is None
    assert engine.run_model(out).mask.equal(modelfile.load(sim_out / "model.prism").mask)
    # what travelled is prismfl's wire format, and the recorded bytes are exactly its length
    ups, downs = bytes_on_the_wire(grid)
    records = rundir.read_metrics(out)
    assert [ups[f"round-{r['round']}"] for r in records] == [r["upload_bytes"] for r in records]
    assert [downs.get(f"round-{r['round']}", 0) for r in records] == [r["download_bytes"] for r in records]
    assert records[0]["download_bytes"] == 0 and records[1]["download_bytes"] == 3 * records[0]["broadcast_bytes"]


@needs_fmnist
def test_fedavg_on_flower_matches_the_simulator_bit_for_bit(tmp_path):
    fedavg = 'train.method="fedavg" train.rounds=2'
    cfg = load_config(SMOKE, fedavg.split())
    sim_out, sim_states = simulate_with_states(cfg, tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": fedavg}, grid)
    assert len(per_round) == 2 and all(torch.equal(a["weights"], b["weights"]) for a, b in zip(per_round, sim_states))
    assert strip(rundir.read_metrics(tmp_path / "fl")) == strip(rundir.read_metrics(sim_out))
    assert (tmp_path / "fl" / DENSE_MODEL).read_bytes() == (sim_out / DENSE_MODEL).read_bytes()
    ups, downs = bytes_on_the_wire(grid)
    assert [ups["round-1"], downs["round-1"]] == [
        rundir.read_metrics(sim_out)[0][k] for k in ("upload_bytes", "download_bytes")
    ]


@needs_fmnist
@pytest.mark.parametrize("modes", [1, 2])
def test_a_conditional_model_on_flower_matches_the_simulator_bit_for_bit(tmp_path, modes):
    """The class counts travel in the set-up replies; the class shares and the model file are the same.
    With model.modes, every node fits the modes on the public hold-out and the counts are per mode; with
    loss.codes_per_step, every step's codes are drawn from the client's seeded generator alike."""
    conditional = 'model.conditional=true model.arch="mlp-up" train.rounds=2'
    if modes > 1:
        conditional += f' model.modes={modes} loss.features="public" loss.codes_per_step=8 train.batch_size=16'
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, conditional.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": conditional}, grid)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(per_round, sim_states))
    assert torch.equal(per_round[-1]["class_shares"], sim_states[-1]["class_shares"])
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()
    spec = modelfile.load(sim_out / "model.prism").spec
    assert (spec.num_classes, spec.modes, len(per_round[-1]["class_shares"])) == (10, modes, 10 * modes)
    assert ("tracker ema, 8 codes a step" in (sim_out / "report.md").read_text()) == (modes > 1)


@needs_fmnist
def test_the_demo_setting_without_public_images_on_flower_matches_the_simulator_bit_for_bit(tmp_path, monkeypatch):
    """The demo's setting in small: the modes from the nodes' moment sums (one exchange before set-up; each
    node reads its own partition only), the warm start at the server on their pooled statistics, the
    quantized broadcast and server momentum."""
    demo = ('model.conditional=true model.arch="mlp-up" model.modes=2 loss.codes_per_step=8 train.batch_size=16 '
            'loss.class_term=true train.warm_start=20 train.rounds=2 train.server_momentum=0.8 '
            'train.broadcast="quantized"')  # fmt: skip
    cfg = load_config(SMOKE, demo.split())
    assert cfg.public_images() == 0
    sim_out, sim_states = simulate_with_states(cfg, tmp_path / "sim")
    read, real = [], federation.Federation.moments
    monkeypatch.setattr(federation.Federation, "moments", lambda fed, k: read.append(k) or real(fed, k))
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": demo}, grid)
    assert sorted(read) == [0, 1, 2]  # each node its own partition's moments, once; nobody all of them
    assert all(torch.equal(a[k], b[k]) for a, b in zip(per_round, sim_states) for k in ("scores", "class_shares"))
    assert strip(rundir.read_metrics(tmp_path / "fl")) == strip(rundir.read_metrics(sim_out))
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()
    assert modelfile.load(sim_out / "model.prism").spec.modes == 2
    # the set-up's bytes, counted alike on both transports (the model files are equal): each node's moment
    # sums (per class it holds, a 196 x 197 / 2 float64 triangle of outer products and more) and statistics
    # up, the modes down
    traffic = modelfile.load(sim_out / "model.prism").info["setup_traffic"]
    held = int((federation.prepare_federation(cfg).table > 0).sum())
    assert traffic["up"] > held * 196 * 197 // 2 * 8 and traffic["down"] > 3 * (2 * 10 * 784 * 8)
    assert "Set-up, before round 1" in (tmp_path / "fl" / "report.md").read_text()


@needs_fmnist
def test_server_momentum_on_flower_matches_the_simulator_bit_for_bit(tmp_path):
    """train.server_momentum: the velocity lives in the server state and in every client's replica; with
    2 of 3 clients a round, some clients catch up over rounds they missed."""
    momentum = "train.server_momentum=0.8 train.rounds=3 train.client_fraction=0.67"
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, momentum.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": momentum}, grid)
    assert len(per_round) == 3 and float(sim_states[-1]["velocity"].abs().max()) > 0
    assert all(torch.equal(a[k], b[k]) for a, b in zip(per_round, sim_states) for k in ("scores", "velocity"))
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()


@needs_fmnist
def test_the_quantized_broadcast_on_flower_matches_the_simulator_bit_for_bit(tmp_path):
    """train.broadcast = "quantized": every round's one message (the same to each client), the uploads coded
    against its levels, and the bytes counted, alike on both transports."""
    quantized = 'train.broadcast="quantized" train.server_momentum=0.8 train.rounds=3 train.client_fraction=0.67'
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, quantized.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": quantized}, grid)
    assert len(per_round) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(per_round, sim_states) for k in ("scores", "velocity"))
    records = rundir.read_metrics(tmp_path / "fl")
    assert strip(records) == strip(rundir.read_metrics(sim_out))
    assert all(r["download_bytes"] == 2 * r["broadcast_bytes"] > 0 for r in records)
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()


@needs_fmnist
@pytest.mark.parametrize("conditional", [False, True])
def test_a_pooled_warm_start_on_flower_matches_the_simulator_bit_for_bit(tmp_path, conditional):
    """train.warm_start without public images: every node sends its statistics in its setup reply, the
    server sums them in partition order and trains the warm start itself (the feature net from the seed)."""
    warm = "train.warm_start=30 train.rounds=2" + (' model.conditional=true model.arch="mlp-up"' if conditional else "")
    cfg = load_config(SMOKE, warm.split())
    assert cfg.public_images() == 0 and cfg.loss.features == "random"
    sim_out, sim_states = simulate_with_states(cfg, tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": warm}, grid)
    assert len(per_round) == 2 and all(torch.equal(a["scores"], b["scores"]) for a, b in zip(per_round, sim_states))
    assert strip(rundir.read_metrics(tmp_path / "fl")) == strip(rundir.read_metrics(sim_out))
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()
    info = modelfile.load(sim_out / "model.prism").info["warm_start"]
    assert info["steps"] == 30 and info["images"] == 3000 and info["source"] == "the clients' pooled statistics"


@needs_fmnist
def test_a_warm_start_on_flower_matches_the_simulator_bit_for_bit(tmp_path):
    """train.warm_start: partition 0's node trains the round-0 scores on the public hold-out and sends
    them in its set-up reply; the server starts from them and sends every client the full state."""
    warm = 'loss.features="public" train.warm_start=30 train.rounds=2'
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, warm.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": warm}, grid)
    assert len(per_round) == 2 and all(torch.equal(a["scores"], b["scores"]) for a, b in zip(per_round, sim_states))
    assert strip(rundir.read_metrics(tmp_path / "fl")) == strip(rundir.read_metrics(sim_out))  # the bytes too
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()
    assert modelfile.load(sim_out / "model.prism").info["warm_start"]["steps"] == 30


@needs_fmnist
def test_pooled_private_statistics_on_flower_match_the_simulator_bit_for_bit(tmp_path, monkeypatch):
    """privacy.pool: the noisy sums travel in the set-up replies, the pooled statistics in one
    query.pool message per node; the rounds then match the simulator's. The noise is made
    reproducible here only (every client draws it from the same OS seed)."""
    import prismfl.privacy

    monkeypatch.setattr(prismfl.privacy.secrets, "randbits", lambda bits: 12345)
    pooled = ('privacy.epsilon=4 privacy.pool=1 privacy.pool_classes="all" model.conditional=true '
              'model.arch="mlp-up" train.batch_size=20 train.rounds=2')  # fmt: skip
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, pooled.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": pooled}, grid)
    assert sum(m.metadata.message_type == "query.pool" for m in grid.sent) == 3
    assert all("shared" in m.content for m in grid.received if m.metadata.message_type == "query")
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(per_round, sim_states))
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()


@needs_fmnist
@pytest.mark.parametrize("shrink", ["", 'loss.features="public" privacy.shrink=true privacy.shrink_to="public"'])
def test_secure_aggregation_on_flower_matches_the_simulator_bit_for_bit(tmp_path, monkeypatch, shrink):
    """privacy.secagg: public keys in the set-up replies, the three stages of the secure sum in query.secagg
    (shares, masked vectors, unmasking), the pooled statistics in query.pool; the masks cancel exactly,
    so the rounds match the simulator's. No message the server receives holds a client's plain vector.
    With privacy.shrink_to = "public",
    partition 0's set-up reply carries the public statistics the server shrinks the secure sum toward."""
    import prismfl.privacy

    monkeypatch.setattr(prismfl.privacy.secrets, "randbits", lambda bits: 12345)
    overrides = f"privacy.epsilon=4 privacy.pool=1 privacy.secagg=true train.rounds=2 {shrink}".strip()
    sim_out, sim_states = simulate_with_states(load_config(SMOKE, overrides.split()), tmp_path / "sim")
    grid = LocalGrid(make_client_app(), nodes_for(3))
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": overrides}, grid)
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count("query.secagg") == 9 and kinds.count("query.pool") == 3
    groups = [m.metadata.group_id for m in grid.sent if m.metadata.message_type == "query.secagg"]
    assert groups == [f"secagg-{stage}" for stage in ("shares", "masked", "unmask") for _ in range(3)]
    assert not any("shared" in m.content for m in grid.received)
    targets = [m for m in grid.received if "shrink-target" in m.content]
    assert len(targets) == (1 if shrink else 0)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(per_round, sim_states))
    assert (tmp_path / "fl" / "model.prism").read_bytes() == (sim_out / "model.prism").read_bytes()


@needs_fmnist
def test_secure_aggregation_on_flower_goes_on_when_30_percent_drop_after_the_key_exchange(tmp_path, monkeypatch):
    """privacy.dropouts = 0.3 with 10 nodes: partitions 0, 2 and 8 send their shares, then nothing. The
    server rebuilds their mask keys and the others' seeds from the shares the survivors hold, its sum
    is exactly the 7 survivors' vectors, and the run goes on. The simulator with faults.dropout = 0.3
    and seed 5 loses the same clients in the secure sum (and 0 and 9 in round 1, silent here too):
    the same sum and the same scores, bit for bit (the noise made reproducible, as above)."""
    import prismfl.privacy
    from prismfl.fl import faults
    from prismfl.secagg import SecAggClient, SecAggServer

    monkeypatch.setattr(prismfl.privacy.secrets, "randbits", lambda bits: 12345)
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
    overrides = ("seed=5 partition.num_clients=10 privacy.epsilon=4 privacy.pool=1 privacy.secagg=true "
                 "privacy.dropouts=0.3 train.rounds=1 train.sample_every=0 train.local_steps=1")  # fmt: skip
    cfg = load_config(SMOKE, [*overrides.split(), "faults.dropout=0.3"])
    fate = {rnd: sorted(faults.draw(cfg, rnd, list(range(10)))) for rnd in (0, 1)}
    assert fate == {0: [0, 2, 8], 1: [0, 9]}
    _, sim_states = simulate_with_states(cfg, tmp_path / "sim")
    nodes = nodes_for(10)
    node = {c["partition-id"]: n for n, c in nodes.items()}
    silent = {(node[k], f"secagg-{stage}") for k in fate[0] for stage in ("masked", "unmask")}
    silent |= {(node[k], "round-1") for k in fate[1]}
    grid = LocalGrid(make_client_app(), nodes, silent=lambda n, group: (n, group) in silent)
    per_round = flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": overrides, "reply-timeout": 0.5},
                                   grid)  # fmt: skip
    (sim_sum, sim_survivors), (summed, survivors) = sums
    assert survivors == sim_survivors == [1, 3, 4, 5, 6, 7, 9]
    total = sum(words[k].view(np.int64).astype(object) for k in survivors)
    assert secagg.encode(secagg.flatten(summed)[0]).view(np.int64).tolist() == list(total)
    assert torch.equal(secagg.flatten(summed)[0], secagg.flatten(sim_sum)[0])
    unmask = [m for m in grid.sent if m.metadata.group_id == "secagg-unmask"]
    assert len(unmask) == 7 and all(m.content["prismfl"]["survivors"] == 7 for m in unmask)
    assert len(per_round) == len(sim_states) == 1 and torch.equal(per_round[0]["scores"], sim_states[0]["scores"])
    assert [f["client"] for f in rundir.read_metrics(tmp_path / "fl")[-1]["failures"]] == [0, 9]


@needs_fmnist
def test_secure_aggregation_stops_when_more_clients_drop_than_privacy_dropouts_allows(tmp_path):
    """Without privacy.dropouts every client's noise share assumes all of them: one silent client stops
    the run before any release, with a line that names it."""
    silent = lambda node, group: node == 101 and group == "secagg-masked"  # noqa: E731 (partition 1)
    grid = LocalGrid(make_client_app(), nodes_for(3), silent=silent)
    overrides = "privacy.epsilon=4 privacy.pool=1 privacy.secagg=true train.rounds=1"
    with pytest.raises(PrismError, match=r"2 of 3 clients sent their masked vector, fewer than the 3 .*start it again "
                                         r".*client 1: masked: no reply within 0.5 s"):  # fmt: skip
        run_federation(grid, server({"out-dir": str(tmp_path / "fl"), "overrides": overrides, "reply-timeout": 0.5}))
    assert not any(m.metadata.group_id == "secagg-unmask" for m in grid.sent)


@needs_fmnist
def test_a_client_refuses_pooled_statistics_of_another_shape(tmp_path):
    """A pool message whose statistics do not fit the client's is an error reply, and the run stops
    with a line naming the client, before any round."""
    from prismfl.flower import server_app
    from prismfl.loss.matching import FeatureStats

    real = server_app.GridTransport.share_pool

    def forged(self, pooled):
        real(self, FeatureStats([m[:, :1] for m in pooled.mean], [v[:, :1] for v in pooled.var], pooled.count,
                                pooled.class_counts))  # fmt: skip

    grid = LocalGrid(make_client_app(), nodes_for(3))
    overrides = "privacy.epsilon=4 privacy.pool=1 model.conditional=true train.batch_size=20 train.rounds=1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_app.GridTransport, "share_pool", forged)
        with pytest.raises(PrismError, match=r"client \d .* did not take the pooled statistics: .*do not match"):
            run_federation(grid, server({"out-dir": str(tmp_path / "fl"), "overrides": overrides}))


@needs_fmnist
@pytest.mark.parametrize("method", ["local", "central"])
def test_local_and_central_run_on_flower_as_in_the_simulator(method, tmp_path):
    overrides = f'train.method="{method}" train.rounds=2'
    sim_out, _ = simulate_with_states(load_config(SMOKE, overrides.split()), tmp_path / "sim")
    flower_with_states({"out-dir": str(tmp_path / "fl"), "overrides": overrides},
                       LocalGrid(make_client_app(), nodes_for(3)))  # fmt: skip
    assert strip(rundir.read_metrics(tmp_path / "fl")) == strip(rundir.read_metrics(sim_out))
    model = "models/client-2.prism" if method == "local" else "model.prism"
    assert (tmp_path / "fl" / model).read_bytes() == (sim_out / model).read_bytes()


@needs_fmnist
def test_a_stopped_flower_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "resumed"
    dead_in_3 = lambda node, group: node == 101 and group == "round-3"  # noqa: E731
    with pytest.raises(PrismError, match="round 3: 2 good uploads"):
        run_federation(LocalGrid(make_client_app(), nodes_for(3), silent=dead_in_3),
                       server({"out-dir": str(out), "reply-timeout": 0.3, "min-replies": 3}))  # fmt: skip
    assert rundir.load_checkpoint(out)["round"] == 2
    with pytest.raises(PrismError, match="not empty"):  # without resume, the run directory is protected
        run_federation(LocalGrid(make_client_app(), nodes_for(3)), server({"out-dir": str(out)}))
    fresh = LocalGrid(make_client_app(), nodes_for(3))  # the SuperNodes restarted: their clients start afresh
    run_federation(fresh, server({"out-dir": str(out), "resume": True}))
    records = rundir.read_metrics(out)
    assert [r["round"] for r in records] == [1, 2, 3] and not any(r.get("aborted") for r in records)
    n = modelfile.load(out / "model.prism").mask.numel()
    state = full_state_bytes(out, 2)  # unknown replicas: the full state of round 2 to each, range-coded
    assert records[2]["download_bytes"] == 3 * state and state < wire.HEADER.size + 4 * n


class Faults:
    """A client mod: corrupts one client's upload in one round, the way a broken link would."""

    def __init__(self, corrupt: set[tuple[int, int]]):
        self.corrupt = corrupt

    def __call__(self, message, context, call_next):
        reply = call_next(message, context)
        k = context.node_config["partition-id"]
        if message.metadata.message_type == "train" and (int(message.content["prismfl"]["round"]), k) in self.corrupt:
            data = bytearray(from_array(reply.content["upload"]["000"]))
            data[-1] ^= 0xFF  # the CRC no longer matches
            reply.content["upload"]["000"] = to_array(bytes(data))
        return reply


@needs_fmnist
def test_a_bad_upload_and_a_silent_client_leave_the_round_to_the_others(tmp_path):
    out = tmp_path / "faults"
    app = make_client_app(mods=[Faults({(1, 1)})])  # client 1's upload of round 1 does not decode
    grid = LocalGrid(app, nodes_for(3), silent=lambda node, group: (node, group) == (100, "round-2"))  # client 2
    run_federation(grid, server({"out-dir": str(out), "reply-timeout": 0.5}))
    records = rundir.read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 2], [0, 1], [0, 1, 2]]
    assert "failures" not in records[2]
    (bad,) = records[0]["failures"]
    assert bad["client"] == 1 and "ChecksumMismatch" in bad["error"]
    (silent,) = records[1]["failures"]
    assert silent["client"] == 2 and "no reply within 0.5 s" in silent["error"]
    # a client that failed gets the full state next time (its replica is unknown), and then trains on
    # it: client 1 in round 2, client 2 in round 3 (whose upload decodes only if its replica is right)
    n = modelfile.load(out / "model.prism").mask.numel()
    assert records[1]["download_bytes"] == 2 * records[0]["broadcast_bytes"] + full_state_bytes(out, 1)
    assert records[2]["download_bytes"] == 2 * records[1]["broadcast_bytes"] + full_state_bytes(out, 2)
    assert records[0]["bits_per_param"] == pytest.approx(8 * records[0]["upload_bytes"] / (2 * n))


@needs_fmnist
def test_too_few_replies_stop_the_run_with_the_round_logged(tmp_path):
    out = tmp_path / "abort"
    grid = LocalGrid(make_client_app(), nodes_for(3), silent=lambda node, group: node == 101 and group != "setup")
    s = server({"out-dir": str(out), "reply-timeout": 0.3, "min-replies": 3})
    with pytest.raises(PrismError, match="round 1: 2 good uploads of 3, fewer than min-replies = 3"):
        run_federation(grid, s)
    (record,) = rundir.read_metrics(out)
    assert record["aborted"] and record["failures"][0]["client"] == 1
    assert not (out / rundir.CHECKPOINT).exists() and not (out / "model.prism").exists()


@needs_fmnist
def test_num_partitions_must_equal_num_clients(tmp_path):
    grid = LocalGrid(make_client_app(), nodes_for(3, num_partitions=4))
    with pytest.raises(PrismError, match=r"num-partitions = 4 but the run has partition.num_clients = 3"):
        run_federation(grid, server({"out-dir": str(tmp_path / "x")}))
    assert not (tmp_path / "x").exists()  # nothing written before every client is set up


def test_missing_supernodes_time_out_with_a_clear_error(tmp_path):
    grid = LocalGrid(make_client_app(), dict(list(nodes_for(3).items())[:2]))
    with pytest.raises(PrismError, match="2 of the 3 SuperNodes"):
        run_federation(grid, server({"out-dir": str(tmp_path / "x"), "connect-timeout": 0.3}))


def test_run_config_maps_onto_prismfl_config(tmp_path, monkeypatch):
    s = server({"overrides": 'train.rounds=7 seed=3 data.root="/some where"', "out-dir": "rel/out",
                "min-replies": 2, "reply-timeout": 30})  # fmt: skip
    assert (s.cfg.train.rounds, s.cfg.seed, s.cfg.data.root) == (7, 3, "/some where")
    assert s.out == Path.cwd() / "rel" / "out" and s.min_replies == 2 and s.reply_timeout == 30.0
    assert s.cfg.partition.num_clients == 3  # the rest comes from the file
    monkeypatch.chdir(ROOT)  # relative config files: the working directory, then the app directory
    assert settings.server_settings({"config-file": "configs/smoke.toml"}).cfg.model.width == 64
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    assert settings.server_settings({"config-file": "configs/smoke.toml"}).cfg.model.width == 64
    with pytest.raises(ConfigError, match="'config-file' = 'nope.toml' not found"):
        settings.server_settings({"config-file": "nope.toml"})
    with pytest.raises(ConfigError, match="unknown run config key"):
        server({"rounds": 3})
    with pytest.raises(ConfigError, match="'min-replies' must be at least 1"):
        server({"min-replies": 0})
    with pytest.raises(ConfigError, match="train.rounds must be an integer in"):
        server({"overrides": "train.rounds=0"})
    with pytest.raises(ConfigError, match="'resume' must be true or false"):
        server({"resume": "yes"})
    assert server({"resume": True}).resume and not server({}).resume


def test_node_config_maps_onto_the_client_config():
    cfg = load_config(SMOKE)
    node = settings.node_settings({"partition-id": 2, "num-partitions": 3, "data-root": "/data/fm", "device": "cpu"})
    local = settings.client_config(cfg.to_dict(), node)
    assert local.data.root == "/data/fm" and local.train.device == "cpu"
    assert settings.client_config(cfg.to_dict(), settings.node_settings({"partition-id": 0, "num-partitions": 3})) \
        == cfg  # fmt: skip
    with pytest.raises(ConfigError, match="lacks partition-id"):
        settings.node_settings({"num-partitions": 3})
    with pytest.raises(ConfigError, match="partition-id = 3 is outside 0..2"):
        settings.client_config(cfg.to_dict(), settings.node_settings({"partition-id": 3, "num-partitions": 3}))
    with pytest.raises(ConfigError, match="'partition-id' must be an integer"):
        settings.node_settings({"partition-id": "0", "num-partitions": 3})


@needs_fmnist
def test_training_messages_load_no_data(tmp_path, monkeypatch):
    """The setup message loads the data once per process; training messages need none (a Flower
    deployment starts a fresh ClientApp process per message)."""
    from prismfl.data import federation
    from prismfl.flower import client_app

    loads, real = [], federation.prepare_federation
    monkeypatch.setattr(federation, "prepare_federation", lambda cfg: loads.append(cfg.seed) or real(cfg))
    client_app.run_context.cache_clear()
    client_app.train_context.cache_clear()
    run_federation(LocalGrid(make_client_app(), nodes_for(3)), server({"out-dir": str(tmp_path / "r")}))
    assert loads == [0]  # three nodes set up in this one process, three rounds trained: one load
    assert client_app.train_context.cache_info().misses == 1
