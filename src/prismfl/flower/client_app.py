"""The Flower ClientApp: a thin adapter over prismfl.fl.task, fl.client and fl.protocol.

Two messages reach a client. "query" (once, at the start): the server's RunConfig in; the client
loads its partition, computes its feature statistics (the only use of its images; privatised when
privacy is on) and answers with what the run directory records about it. "train" (each round it is
chosen): the broadcast messages that bring its replica of the global scores up to date in; one
encoded mask out. Between messages everything the client keeps (its config, statistics, Adam and
tracker state, and its replica with the round it belongs to) lives in Flower's Context.state.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import zlib

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prismfl.config import config_from_dict
from prismfl.errors import PrismError
from prismfl.fl import task, wire
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.fl.protocol import apply_broadcast, client_upload
from prismfl.flower.payload import TORCH, from_array, to_array, torch_bytes, torch_object, wire_messages
from prismfl.flower.settings import client_config, node_settings
from prismfl.model import masked

log = logging.getLogger("flwr").info

NODE, BLOBS = "prismfl.node", "prismfl.blobs"  # Context.state records


def scores_crc(scores: torch.Tensor) -> int:
    """CRC-32 of the float32 scores: server and client check that their replicas agree bit for bit."""
    return zlib.crc32(scores.detach().cpu().to(torch.float32).numpy().tobytes())


def _model(cfg, device: str):
    model = task.build_model(cfg, device)
    return model, masked.num_maskable(model), wire.layer_table_hash(masked.layer_table(model))


@functools.lru_cache(maxsize=2)
def _feature_net(cfg_json: str, device: str):
    """The loss's frozen feature network, built once per process (Ray actors of the simulation engine
    serve many messages; a deployment's ClientApp process serves one)."""
    cfg = config_from_dict(json.loads(cfg_json))
    return task.build_feature_net(cfg, task.prepare_federation(cfg), device, log)[0]


def setup(message: Message, context: Context) -> Message:
    node = node_settings(dict(context.node_config))
    cfg = client_config(json.loads(message.content["prismfl"]["config"]), node)
    k = node.partition_id
    device = task.resolve_device(cfg.train.device)
    fed = task.prepare_federation(cfg)
    extract_net, feature_meta = task.build_feature_net(cfg, fed, device, log)
    clip = None if math.isinf(cfg.privacy.epsilon) else task.privacy_clip(cfg, fed, extract_net.extract, device)
    stats, summary = task.client_statistics(cfg, extract_net.extract, fed.client_images(k), clip, device)
    _, n, table_hash = _model(cfg, device)
    replica = wire.encode_state(task.initial_scores(cfg, n), round_=0, table_hash=table_hash)  # from the seed
    context.state[NODE] = ConfigRecord({"config": json.dumps(cfg.to_dict()), "partition-id": k, "held-round": 0})
    context.state[BLOBS] = ArrayRecord({
        "stats": to_array(torch_bytes(stats), TORCH),
        "client": to_array(torch_bytes(ClientState().state_dict()), TORCH),
        "replica": to_array(replica),
    })  # fmt: skip
    log(f"prismfl client {k}: {len(fed.parts[k])} images, statistics ready, {n:,} maskable weights")
    reply = {
        "partition-id": k,
        "class-counts": [int(c) for c in fed.table[k]],
        "source": fed.train.source,
        "model-info": json.dumps({"feature_net": feature_meta, "privacy": summary}),
        "num-weights": n,
        "table-hash": f"{table_hash:016x}",
    }
    return Message(RecordDict({"prismfl": ConfigRecord(reply)}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    if NODE not in context.state:
        raise PrismError("this client has no state for the run: it missed the setup message (restarted?)")
    node, blobs = context.state[NODE], context.state[BLOBS]
    cfg = client_config(json.loads(node["config"]), node_settings(dict(context.node_config)))
    k = int(node["partition-id"])
    request = message.content["prismfl"]
    rnd = int(request["round"])
    device = task.resolve_device(cfg.train.device)
    model, n, table_hash = _model(cfg, device)

    held, scores = wire.decode_state(from_array(blobs["replica"]), num_weights=n, table_hash=table_hash)
    for data in wire_messages(message.content["broadcast"]) if "broadcast" in message.content else []:
        if wire.parse(data, table_hash=table_hash, num_weights=n).kind == wire.KIND_STATE:
            held, scores = wire.decode_state(data, num_weights=n, table_hash=table_hash)
        else:  # a delta takes the replica one round forward; it names the round it must be applied to
            scores = apply_broadcast(scores, data, round_=held + 1, table_hash=table_hash)
            held += 1
    if held != rnd - 1 or scores_crc(scores) != int(request["scores-crc32"]):
        raise PrismError(f"client {k}: its replica of round {held} does not match the server's round {rnd - 1}")

    stats = torch_object(from_array(blobs["stats"], TORCH))
    state = ClientState.from_state_dict(torch_object(from_array(blobs["client"], TORCH)), cfg.loss.tracker_lr)
    extract_net = _feature_net(json.dumps(cfg.to_dict(), sort_keys=True), device)
    local_cfg = LocalConfig(cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr)
    gen = task.generator_for(cfg.seed, "client", rnd, k, device=device)
    t_train = time.perf_counter()
    result = local_train(model, scores.to(device), task.client_loss(cfg, stats, device), extract_net.extract, state,
                         local_cfg, gen)  # fmt: skip
    train_seconds = time.perf_counter() - t_train
    upload = client_upload(result.mask, scores, round_=rnd, table_hash=table_hash, coder=cfg.train.upload_coder)

    context.state[NODE] = ConfigRecord({"config": node["config"], "partition-id": k, "held-round": held})
    context.state[BLOBS] = ArrayRecord({
        "stats": blobs["stats"],
        "client": to_array(torch_bytes(state.state_dict()), TORCH),
        "replica": to_array(wire.encode_state(scores, round_=held, table_hash=table_hash)),
    })  # fmt: skip
    content = RecordDict({
        "upload": ArrayRecord({"000": to_array(upload)}),
        "prismfl": ConfigRecord({"partition-id": k, "held-round": held}),
        "metrics": MetricRecord({"loss": float(result.loss), "start-loss": float(result.start_loss),
                                 "train-seconds": train_seconds, "seconds": time.perf_counter() - t0}),
    })  # fmt: skip
    return Message(content, reply_to=message)


def make_client_app(mods=()) -> ClientApp:
    """The ClientApp; `mods` are Flower client mods (the tests use one to inject faults)."""
    app = ClientApp(mods=list(mods))
    app.query()(setup)
    app.train()(train)
    return app


app = make_client_app()
