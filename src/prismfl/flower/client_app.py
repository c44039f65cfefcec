"""The Flower ClientApp: a thin adapter over the client side of prismfl's methods (fl.methods, fl.client).

Two messages reach a client. "query" (once, at the start): the server's RunConfig in; the client
computes its feature statistics (the only use of its images; privatised when privacy is on) and
answers with what the run directory records about it (with privacy.pool, also its release's noisy
sums; with privacy.secagg, its two public keys, then its part of each stage of the secure sum in
"query.secagg": its sealed shares, its masked vector, the shares it holds; the pooled
statistics come back once in "query.pool"). "train" (each round it is chosen): the
round's wire messages in (for PRISM, the broadcasts that bring its replica of the global scores up
to date); one upload out. What a client keeps between messages (its statistics, Adam and tracker
state, replica) lives in Flower's Context.state as a safestate blob (no pickles). What a process
builds for a run (the data view, the feature net, the generator) is built once per process.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prismfl import safestate
from prismfl.config import config_from_dict
from prismfl.device import resolve_device
from prismfl.errors import PrismError
from prismfl.fl.client import (
    ClientRuntime,
    client_context,
    moments_message,
    released_moments,
    reported_counts,
    statistics_message,
    training_context,
    warm_start,
)
from prismfl.fl.methods import registry as methods
from prismfl.fl.methods.base import Downlink
from prismfl.flower.payload import LINK_KEY_BYTES, SECAGG, STATE, downlink_tag, from_array, to_array, wire_messages
from prismfl.flower.settings import client_config, node_settings
from prismfl.loss.matching import FeatureStats
from prismfl.secagg import SecAggClient

log = logging.getLogger("flwr").info

NODE, BLOBS = "prismfl.node", "prismfl.blobs"  # Context.state records


@functools.lru_cache(maxsize=2)
def run_context(cfg_json: str):
    """(method, ClientContext) for the setup message: the data and the feature net, built once per
    process (Ray actors of the simulation engine serve many nodes and messages)."""
    cfg = config_from_dict(json.loads(cfg_json))
    method = methods.build(cfg)
    return method, client_context(cfg, method.build_model, resolve_device(cfg.train.device), log)


@functools.lru_cache(maxsize=2)
def train_context(cfg_json: str, recipe_json: str):
    """(method, ClientContext) for training messages, built once per process and without loading
    the data (a deployment starts a ClientApp process per message): the client's statistics are in
    its saved state and the feature net comes back from the recipe setup recorded."""
    cfg = config_from_dict(json.loads(cfg_json))
    method = methods.build(cfg)
    device = resolve_device(cfg.train.device)
    return method, training_context(cfg, method.build_model, device, json.loads(recipe_json))


def _save(context: Context, cfg_json: str, recipe_json: str, client: ClientRuntime, link_key: bytes) -> None:
    context.state[NODE] = ConfigRecord({"config": cfg_json, "feature-recipe": recipe_json, "partition-id": client.k,
                                        "link-key": link_key})  # fmt: skip
    context.state[BLOBS] = ArrayRecord({"client": to_array(safestate.to_bytes(client.state_dict()), STATE)})


def moments(message: Message, context: Context) -> Message:
    """model.modes without public images: this node's moment sums out (data/modes.py), before set-up."""
    node = node_settings(dict(context.node_config))
    cfg = client_config(json.loads(message.content["prismfl"]["config"]), node)
    _, ctx = run_context(json.dumps(cfg.to_dict(), sort_keys=True))
    blob = moments_message(released_moments(cfg, ctx.fed, node.partition_id))
    content = RecordDict({"prismfl": ConfigRecord({"partition-id": node.partition_id}),
                          "moments": ArrayRecord({"000": to_array(blob, STATE)})})  # fmt: skip
    return Message(content, reply_to=message)


def _take_modes(message: Message, ctx) -> None:
    """The modes the server fitted on the nodes' moment sums, where the run needs them: checked, then
    what this node's images' codes come from (it never reads another partition's images)."""
    import numpy as np

    from prismfl.data.modes import Modes

    cfg = ctx.cfg
    if cfg.model.modes == 1 or ctx.fed.public_idx.size:
        return
    if "modes" not in message.content:
        raise PrismError("the setup message carries no modes, which this run's model.modes need")
    tree = safestate.from_bytes(from_array(message.content["modes"]["000"], STATE), "modes")
    try:
        if not (isinstance(tree, dict) and all(hasattr(v, "numpy") for v in tree.values())):
            raise ValueError("modes must be a table of tensors")
        arrays = {key: np.asarray(v.numpy()) for key, v in tree.items()}
        size = int(np.prod(ctx.fed.train.images.shape[1:]))
        ctx.fed.given_modes = Modes.from_arrays(arrays, cfg.model.modes, ctx.fed.num_classes, size)
    except ValueError as exc:
        raise PrismError(f"the setup message's modes: {exc}") from None


def setup(message: Message, context: Context) -> Message:
    node = node_settings(dict(context.node_config))
    cfg = client_config(json.loads(message.content["prismfl"]["config"]), node)
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    method, ctx = run_context(cfg_json)
    k = node.partition_id
    _take_modes(message, ctx)
    client = ClientRuntime.released(k, method.release(ctx, *method.client_data(ctx, k))) if method.holds_data(k) \
        else ClientRuntime(k, None)  # fmt: skip
    method.init_client(ctx, client)
    link_key = os.urandom(LINK_KEY_BYTES)  # the server tags every train message with it (downlink_tag)
    _save(context, cfg_json, json.dumps(ctx.feature_recipe, sort_keys=True), client, link_key)
    log(f"prismfl client {k}: {len(ctx.fed.parts[k])} images, statistics ready, {ctx.num_weights:,} weights")
    row, counts = reported_counts(client, ctx.fed.table[k], not math.isinf(cfg.privacy.epsilon))
    reply = {
        "partition-id": k,
        "class-counts": row,
        "source": ctx.fed.train.source,
        "model-info": json.dumps({"feature_net": ctx.feature_meta, "privacy": client.privacy}),
        "num-weights": ctx.num_weights,
        "table-hash": f"{ctx.table_hash:016x}",
        "link-key": link_key,
    }
    if counts is not None:
        reply["statistics-class-counts"] = counts
    warm = None
    if k == 0 and int(message.content["prismfl"].get("warm-start", 0)):  # a fresh run's train.warm_start
        warm, warm_info = warm_start(ctx, cfg.train.warm_start)
        reply["warm-start-info"] = json.dumps(warm_info)
    if cfg.privacy.secagg:  # its public keys and vector layout; the vector itself goes masked, in query.secagg
        public = client.shared.public()
        reply["secagg-public-key"], reply["secagg-layout"] = public["public_key"], json.dumps(public["layout"])
        reply["secagg-share-key"], reply["secagg-clip"] = public["share_key"], json.dumps(public["clip"])
    content = RecordDict({"prismfl": ConfigRecord(reply)})
    if warm is not None:  # the round-0 scores trained on the public hold-out, a wire state message
        content["warm-start"] = ArrayRecord({"000": to_array(warm)})
    target = ctx.shrink_target() if k == 0 and cfg.privacy.secagg else None  # privacy.shrink_to = "public"
    if target is not None:  # the public hold-out's clipped statistics, which the server shrinks the secure sum toward
        content["shrink-target"] = ArrayRecord({"000": to_array(safestate.to_bytes(target), STATE)})
    if int(message.content["prismfl"].get("send-statistics", 0)) and client.stats is not None:
        # a warm start without public images: the server trains it on the sum of what the clients released
        content["statistics"] = ArrayRecord({"000": to_array(statistics_message(client.stats), STATE)})
    if client.shared is not None and not cfg.privacy.secagg:  # privacy.pool: its release's noisy sums (DP)
        content["shared"] = ArrayRecord({"000": to_array(safestate.to_bytes(client.shared), STATE)})
    return Message(content, reply_to=message)


def _saved_run(context: Context) -> tuple[str, str]:
    """(config JSON, feature-net recipe JSON) that the setup message saved in this client's state."""
    if NODE not in context.state:
        raise PrismError("this client has no state for the run: it missed the setup message (restarted?)")
    return context.state[NODE]["config"], context.state[NODE]["feature-recipe"]


def _link_key(context: Context) -> bytes:
    if "link-key" not in context.state[NODE]:
        raise PrismError("this client's state has no link key: it was set up by another prismfl version; "
                         "restart the run")  # fmt: skip
    return context.state[NODE]["link-key"]


def _saved_client(context: Context, tracker_lr: float) -> ClientRuntime:
    saved = safestate.from_bytes(from_array(context.state[BLOBS]["client"], STATE), "client state")
    return ClientRuntime.from_state_dict(saved, tracker_lr)


def _restore(context: Context):
    """(cfg_json, recipe_json, cfg, client) from the client's saved state."""
    cfg_json, recipe_json = _saved_run(context)
    cfg = config_from_dict(json.loads(cfg_json))
    return cfg_json, recipe_json, cfg, _saved_client(context, cfg.loss.tracker_lr)


def secagg(message: Message, context: Context) -> Message:
    """privacy.secagg: one stage of the secure sum (secagg.SecAggClient.answer): the server's request in,
    the client's part out (its masked vector in an array record). After the unmask stage the client
    saves what it answered, and answers no other unmask request."""
    cfg_json, recipe_json, _, client = _restore(context)
    if not isinstance(client.shared, SecAggClient):
        raise PrismError(f"client {client.k} has no secure-aggregation state (set up without privacy.secagg?)")
    request = dict(message.content["prismfl"])
    stage = request.pop("stage", None)
    reply = client.shared.answer(client.k, stage, request)
    if stage == "unmask":
        _save(context, cfg_json, recipe_json, client, _link_key(context))
    masked = reply.pop("masked", None)
    content = RecordDict({"prismfl": ConfigRecord({"partition-id": client.k, **reply})})
    if masked is not None:
        content["masked"] = ArrayRecord({"000": to_array(masked, SECAGG)})
    return Message(content, reply_to=message)


def pool(message: Message, context: Context) -> Message:
    """privacy.pool: the pooled statistics in; the client mixes them into its targets (once, before round 1)."""
    cfg_json, recipe_json, cfg, client = _restore(context)
    tree = safestate.from_bytes(from_array(message.content["pooled"]["000"], STATE), "pooled statistics")
    client.take_pool(cfg, FeatureStats.from_tree(tree))
    _save(context, cfg_json, recipe_json, client, _link_key(context))
    return Message(RecordDict({"prismfl": ConfigRecord({"partition-id": client.k})}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    cfg_json, recipe_json = _saved_run(context)
    try:
        method, ctx = train_context(cfg_json, recipe_json)
    except PrismError:  # this process cannot see the cache setup used: load the data and rebuild it
        method, ctx = run_context(cfg_json)
    client = _saved_client(context, ctx.cfg.loss.tracker_lr)
    request = message.content["prismfl"]
    check = int(request["check-crc32"]) if "check-crc32" in request else None
    messages = wire_messages(message.content["broadcast"]) if "broadcast" in message.content else []
    down = Downlink(int(request["round"]), messages, int(request["steps"]), check)
    tag = downlink_tag(_link_key(context), down.round, down.steps, check, messages)
    if not hmac.compare_digest(tag, bytes(request.get("auth", b""))):
        raise PrismError(f"client {client.k}: the train message of round {down.round} does not carry the tag of "
                         "this run's server (altered on the way, or not from the server)")  # fmt: skip
    upload = method.client_round(ctx, client, down)
    _save(context, cfg_json, recipe_json, client, _link_key(context))
    content = RecordDict({
        "upload": ArrayRecord({"000": to_array(upload.data)}),
        "prismfl": ConfigRecord({"partition-id": client.k, "held-round": client.held_round}),
        "metrics": MetricRecord({"loss": upload.loss, "start-loss": upload.start_loss,
                                 "train-seconds": upload.seconds, "seconds": time.perf_counter() - t0}),
    })  # fmt: skip
    return Message(content, reply_to=message)


def make_client_app(mods=()) -> ClientApp:
    """The ClientApp; `mods` are Flower client mods (the tests use one to inject faults)."""
    app = ClientApp(mods=list(mods))
    app.query()(setup)
    app.query("pool")(pool)
    app.query("moments")(moments)
    app.query("secagg")(secagg)
    app.train()(train)
    return app


app = make_client_app()
