"""The client side: local training, and what a client process builds once and keeps between rounds.

Only the client touches its images, and only through `MeanVarMatching`, which holds its feature
statistics. What persists on a client across rounds (its Adam state and loss trackers) lives in
`ClientState`; everything random comes from the generator it is handed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prismfl import safestate, schema
from prismfl.accounting import budget
from prismfl.config import RunConfig
from prismfl.data import federation
from prismfl.data.federation import Federation
from prismfl.errors import PrismError
from prismfl.fl import wire
from prismfl.loss import feature_nets
from prismfl.loss.matching import ConditionalMatching, FeatureStats, MeanVarMatching, TrackerState, feature_stats
from prismfl.model import masked
from prismfl.model.build import initial_scores
from prismfl.progress import bar as progress_bar
from prismfl.progress import line as progress_line
from prismfl.seeds import generator_for


@dataclass
class LocalConfig:
    steps: int = 50
    batch_size: int = 64
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    optimizer: dict | None = None
    tracker: TrackerState = field(default_factory=TrackerState)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer, "tracker": self.tracker.state_dict()}

    @staticmethod
    def schema(params: list[tuple[int, ...]] | None = None) -> schema.Node:
        """What state_dict writes: the local Adam's state (null before the first round) over the tensors local
        training updates, of the shapes `params` where known (any learning rate: each round sets its own;
        LocalConfig's betas), and the trackers (TrackerState.schema; checked against the loss where the
        statistics are known, ClientRuntime.from_state_dict)."""
        betas = schema.Const(list(LocalConfig.betas), what=f"{list(LocalConfig.betas)} (the local Adam's betas)")
        optimizer = schema.Opt(schema.adam(params, schema.Num(0, above=True), betas))
        return schema.Table({"optimizer": optimizer, "tracker": TrackerState.schema()},
                            what="a client's optimizer and trackers (a table)")  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict, tracker_lr: float = 1e-5, *, params: list[tuple[int, ...]] | None = None,
                        where: str = "client state", path: str = "", checked: bool = False) -> ClientState:  # fmt: skip
        """The inverse of state_dict, after a check against `schema` (`checked`: the caller has checked it)."""
        if not checked:
            schema.check(ClientState.schema(params), state, where, path)
        return cls(state["optimizer"], TrackerState.from_state_dict(state["tracker"], tracker_lr, expect=schema.ANY))


@dataclass
class LocalResult:
    mask: torch.Tensor | None  # bool, one entry per maskable weight (None for a dense model)
    loss: float  # mean matching loss over the local steps
    start_loss: float  # loss of the first step: the broadcast global model on this client's data
    scores: torch.Tensor  # the client's trained scores, or float weights of a dense model


def local_train(
    model: nn.Module,
    global_scores: torch.Tensor,
    loss_fn: MeanVarMatching,
    extract,
    *,
    state: ClientState,
    cfg: LocalConfig,
    generator: torch.Generator,
) -> LocalResult:
    """Start from the global scores, take `cfg.steps` Adam steps on the matching loss, sample a mask.

    For a dense model (the FedAvg baseline) the same loop trains float weights and returns them.
    """
    device = global_scores.device
    masked.set_trainable(model, global_scores)
    masked.set_fixed_mask(model, None)
    masked.configure(model, rng=generator)
    params = masked.trainable(model)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
        for group in opt.param_groups:  # the saved state carries the lr of its round: this round's rules
            group["lr"] = cfg.lr
    model.train()
    total, first = 0.0, None
    # a conditional loss: the classes of every batch (drawn afresh at every step when it draws a subset)
    labels = None if loss_fn.redraws else loss_fn.labels(cfg.batch_size, device)
    for _ in range(cfg.steps):
        if loss_fn.redraws:
            labels = loss_fn.labels(cfg.batch_size, device, generator)
        z = torch.randn(cfg.batch_size, model.z_dim, generator=generator, device=device)
        images = model(z) if labels is None else model(z, labels)
        surrogate, value = loss_fn(extract(images), state.tracker, labels)
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()
        total += value
        first = value if first is None else first
    state.optimizer = opt.state_dict()
    scores = masked.get_trainable(model)
    if masked.is_dense(model):
        return LocalResult(mask=None, loss=total / cfg.steps, start_loss=first, scores=scores)
    uniforms = torch.rand(scores.shape, generator=generator, device=device)
    mask = uniforms < torch.sigmoid(scores)
    return LocalResult(mask=mask, loss=total / cfg.steps, start_loss=first, scores=scores)


# ---------------------------------------------------------------- what a client process holds


@dataclass
class ClientContext:
    """What a client process builds once for a run (whatever the number of clients it serves): the
    federation's data view, the loss's feature network and the generator."""

    cfg: RunConfig
    device: str
    fed: Federation | None  # None: a context that only trains (its statistics were computed before)
    extract: object  # images -> list of feature tensors
    feature_meta: dict
    feature_recipe: dict  # how to rebuild the feature net without the data (feature_nets.feature_net_from_recipe)
    model: nn.Module
    num_weights: int
    table_hash: int
    _clip: list[float] | None = None
    _shrink_target: dict | None = None
    replica_memo: OrderedDict = field(default_factory=OrderedDict)  # methods' decoded broadcasts (fl.methods.prism)

    def privacy_clip(self) -> list[float]:
        """Per-layer clip bounds of the private release, computed once from non-private images."""
        if self._clip is None:
            from prismfl.privacy import privacy_clip

            self._clip = privacy_clip(self.cfg, self.fed, self.extract, self.device)
        return self._clip

    def shrink_target(self) -> dict | None:
        """privacy.shrink_to = "public": the public hold-out's clipped statistics that a private release
        is shrunk toward (privacy.public_target), computed once; None for any other setting."""
        p = self.cfg.privacy
        if not (p.shrink and p.shrink_to == "public"):
            return None
        if self._shrink_target is None:
            from prismfl.privacy import public_target

            idx, classes = self.fed.public_idx, self.cfg.arch_spec().codes
            self._shrink_target = public_target(lambda x: self.extract(x.to(self.device)), self.fed.images(idx),
                                                self.privacy_clip(), labels=self.fed.labels(idx) if classes else None,
                                                num_classes=classes)  # fmt: skip
        return self._shrink_target

    def local_config(self, steps: int, lr: float | None = None) -> LocalConfig:
        return LocalConfig(steps, self.cfg.train.batch_size, self.cfg.train.lr if lr is None else lr)


def client_context(cfg: RunConfig, build_model, device: str, log=print) -> ClientContext:
    """Load the data, build (or fetch from the cache) the feature net, then the model with
    `build_model(device)`; bad data fails here, before anything is written."""
    fed = federation.prepare_federation(cfg)
    net, meta, recipe = feature_nets.build_feature_net(cfg, fed, device, log)
    model = build_model(device)
    return ClientContext(cfg, device, fed, net.extract, meta, recipe, model, *wire.model_layout(model))


def training_context(cfg: RunConfig, build_model, device: str, recipe: dict) -> ClientContext:
    """A context for local training only, without loading any data: what a process that handles one
    round's message needs (a Flower deployment starts a ClientApp process per message)."""
    net = feature_nets.feature_net_from_recipe(cfg, recipe, device)
    model = build_model(device)
    return ClientContext(cfg, device, None, net.extract, {}, recipe, model, *wire.model_layout(model))


def client_loss(cfg: RunConfig, stats: FeatureStats, device: str = "cpu",
                privacy: dict | None = None) -> MeanVarMatching:  # fmt: skip
    """The client's matching loss; per class for a conditional model, over the classes it holds: with
    privacy, those whose noisy count is above three noise deviations (post-processing of the release)."""
    loss = cfg.loss
    options = {"tracker": loss.tracker, "tracker_beta": loss.tracker_beta, "tracker_lr": loss.tracker_lr}
    if privacy and loss.moment == "mean":  # no variances released: each layer weighed by its public clip bound
        options["scales"] = privacy["clip"]
    if not cfg.model.conditional:
        return MeanVarMatching(stats, loss.moment, **options).to(device)
    from prismfl.privacy import min_count

    return ConditionalMatching(stats, loss.moment, min_count=min_count(privacy),
                               codes_per_step=loss.codes_per_step, **options).to(device)  # fmt: skip


@dataclass
class ClientRuntime:
    """Everything one client keeps between rounds: its feature statistics (the only trace of its
    images, released privately when privacy is on), its Adam and tracker state, its replica of the
    global state and the round it belongs to, and, for methods that never share it, its own scores."""

    k: int
    stats: FeatureStats | None  # None: a client that holds no data for this method (central's others)
    privacy: dict | None = None
    state: ClientState = field(default_factory=ClientState)
    held_round: int = 0
    replica: torch.Tensor | None = None
    own: torch.Tensor | None = None
    # what it shares until the server pools it: its release's noisy sums (privacy.pool), or its side of
    # secure aggregation (privacy.secagg; kept in the client's own saved state between Flower messages)
    shared: object = None
    _loss: MeanVarMatching | None = None

    @classmethod
    def released(cls, k: int, release: tuple) -> ClientRuntime:
        """A client from `Method.release`'s (statistics, privacy parameters, shared sums)."""
        stats, privacy, shared = release
        return cls(k, stats, privacy, shared=shared)

    def take_pool(self, cfg: RunConfig, pooled: FeatureStats) -> None:
        """Train from now on against the mix of the pooled statistics and its own (privacy.pool)."""
        from prismfl.privacy import min_count, mix_stats

        if self.stats is None and self.shared is None:
            return  # holds no data for this method
        own = pooled if self.stats is None else self.stats  # secagg: no statistics of its own
        self.stats = mix_stats(own, pooled, cfg.privacy.pool, all_classes=cfg.privacy.pool_classes == "all",
                               min_count=min_count(self.privacy))  # fmt: skip
        self.shared, self._loss = None, None

    def loss(self, cfg: RunConfig, device: str) -> MeanVarMatching:
        if self.stats is None:
            raise PrismError(f"client {self.k} holds no data for method {cfg.train.method!r}")
        if self._loss is None:
            try:
                self._loss = client_loss(cfg, self.stats, device, self.privacy)
            except ValueError as exc:  # e.g. no class of a conditional client above the privacy noise
                raise PrismError(f"client {self.k}: {exc}") from None
        return self._loss

    def state_dict(self) -> dict:
        from prismfl.secagg import SecAggClient

        stats = None if self.stats is None else self.stats.to_tree()
        secagg = self.shared.to_tree() if isinstance(self.shared, SecAggClient) else None
        return {"k": self.k, "stats": stats, "privacy": self.privacy, "state": self.state.state_dict(),
                "held_round": self.held_round, "replica": self.replica, "own": self.own, "secagg": secagg}  # fmt: skip

    @staticmethod
    def schema(expect: schema.Expect, cfg: RunConfig | None = None, fields: dict | None = None) -> schema.Node:
        """What state_dict writes. Without `cfg`, what any client state holds (a Flower client's own saved
        state). With `cfg`, as a checkpoint of a run of cfg holds it (every client there holds data and has
        pooled its statistics): statistics of the feature layers `expect.features` and the model's classes,
        the release's parameters with privacy on (privacy.summary_schema) and null with it off, the Adam
        state over `expect.params`, a held round before the checkpoint's, no secure-aggregation state, and
        the method's `replica` and `own` (`fields`: Method.client_fields). The trackers' shapes depend on the
        statistics: from_state_dict checks them once those are known (`tracker_schema`)."""
        tensor = schema.Opt(schema.Tensor(torch.float32, (None,)))
        if cfg is None:
            return schema.Table({"k": expect.client, "stats": schema.Opt(FeatureStats.schema()),
                                 "privacy": schema.Opt(schema.Table({}, extra=schema.Json())),
                                 "state": ClientState.schema(), "held_round": expect.rounds(),
                                 "replica": tensor, "own": tensor}, optional={"secagg": schema.Opt(schema.Table({}))},
                                what="a client's state (a table)")  # fmt: skip
        from prismfl.privacy import summary_schema

        features = expect.features
        before = None if expect.round is None else expect.round - 1
        return schema.Table(
            {"k": expect.client, "stats": FeatureStats.schema(features, cfg.arch_spec().codes),
             "privacy": summary_schema(cfg, None if features is None else len(features)),
             "state": ClientState.schema(expect.params), "held_round": expect.rounds(before),
             **(fields or {"replica": tensor, "own": tensor})},
            optional={"secagg": schema.Null()}, what="a client's state (a table)")  # fmt: skip

    @classmethod
    def from_state_dict(cls, d: dict, tracker_lr: float, *, cfg: RunConfig | None = None,
                        expect: schema.Expect | None = None, fields: dict | None = None,
                        where: str = "client state", path: str = "") -> ClientRuntime:  # fmt: skip
        """The inverse of state_dict, after a check against `schema` (with `cfg`, `expect` and `fields`: as
        a checkpoint of a run of cfg holds it, its trackers checked against the loss of its statistics).
        A StateError naming the first field that does not fit; a ValueError where the statistics' parts
        do not fit one another."""
        expect = expect or schema.Expect()
        schema.check(ClientRuntime.schema(expect, cfg, fields), d, where, path)
        try:
            stats = None if d["stats"] is None else FeatureStats.from_tree(d["stats"], checked=True)
        except ValueError as exc:
            raise ValueError(f"client {d['k']}: its statistics: {exc}") from None
        if cfg is not None and stats is not None:

            def trackers(tree, at: str) -> None:
                tracker_schema(cfg, stats, d["privacy"], schema.join(path, "stats"))(tree, at)

            schema.check(trackers, d["state"]["tracker"], where, schema.join(schema.join(path, "state"), "tracker"))
        shared = None
        if d.get("secagg") is not None:
            from prismfl.secagg import SecAggClient

            shared = SecAggClient.from_tree(d["secagg"])
        state = ClientState.from_state_dict(d["state"], tracker_lr, checked=True)
        return cls(d["k"], stats, d["privacy"], state, d["held_round"], d["replica"], d["own"], shared)


def tracker_schema(cfg: RunConfig, stats: FeatureStats, privacy: dict | None, path: str = "stats") -> schema.Node:
    """What a client's trackers may hold (TrackerState.schema) for the loss of `stats` in a run of `cfg`: of
    the shapes of its statistics; a conditional loss's trackers of an older layout start afresh."""
    try:
        loss = client_loss(cfg, stats, "cpu", privacy)
    except ValueError as exc:  # e.g. no class above the noise: what ClientRuntime.loss refuses
        schema.fail(path, "statistics this run's loss can match", got=f"statistics it refuses ({exc})")
    return TrackerState.schema(cfg.loss.tracker, [tuple(t.shape) for t in loss.targets], redraws=loss.redraws,
                               legacy=cfg.model.conditional, lr=cfg.loss.tracker_lr)  # fmt: skip


NOISY_TOTAL = "images (noisy)"  # the class table's one column when private clients released no per-class counts
NOT_REPORTED = "not reported"  # secure aggregation: no client reports anything of its own


def reported_counts(client: ClientRuntime, exact, private: bool = False) -> tuple[list[int], list[float] | None]:
    """What a client tells the server about its data at setup: its row of the class table, and for a
    conditional model the class counts of its statistics (the server's class shares are their sum).

    With privacy (`private`) both come from the release's noisy counts, since the exact ones would
    leak: per class for a conditional model (with model.modes, the row sums each class's modes; the
    counts stay per mode); an unconditional release holds one noisy count, so
    the row is that total alone (the table's one column is NOISY_TOTAL); a client that holds no data
    for the method reports an empty row (zeros in the table)."""
    counts = None if client.stats is None else client.stats.class_counts
    reported = None if counts is None else [float(c) for c in counts]
    if not private:
        return [int(c) for c in exact], reported
    if client.stats is None:
        return [], None
    if counts is None:
        return [max(0, int(client.stats.count))], None
    per_class = counts.reshape(len(exact), -1).sum(1)  # the class table's row: one column per class
    return [max(0, int(round(float(c)))) for c in per_class], reported


def class_table_of(rows: list[list[int]], class_names: list[str]):
    """The server's class table (clients x classes) from the rows the clients reported, and its
    column names: the classes, or NOISY_TOTAL when private clients reported one noisy total each."""
    widths = {len(r) for r in rows if r}
    if not widths:
        return np.zeros((len(rows), 1), dtype=np.int64), [NOT_REPORTED]
    if len(widths) != 1 or next(iter(widths)) not in (1, len(class_names)):
        raise PrismError(f"the clients reported class counts of different lengths for {len(class_names)} classes")
    width = widths.pop()
    table = np.array([r or [0] * width for r in rows], dtype=np.int64)
    return table, class_names if width == len(class_names) else [NOISY_TOTAL]


def round_lr(lr: float, round_: int, rounds: int, schedule: str = "constant", floor: float = 0.1) -> float:
    """The clients' learning rate in round `round_` (1-based) of `rounds` (train.lr_schedule): `lr`
    throughout, or a cosine from `lr` in round 1 to `floor * lr` in round `rounds` (and after it)."""
    if schedule == "constant" or rounds <= 1:
        return lr
    t = min(max((round_ - 1) / (rounds - 1), 0.0), 1.0)
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_round(ctx: ClientContext, client: ClientRuntime, start: torch.Tensor, *, round_: int, steps: int,
                lr: float | None = None) -> LocalResult:  # fmt: skip
    """One round of local training from `start` (scores, or a dense model's weights) with the
    client's persistent state, at the round's learning rate (`lr`, default train.lr, under
    train.lr_schedule); every random draw comes from the (seed, round, client) stream."""
    train = ctx.cfg.train
    lr = round_lr(train.lr if lr is None else lr, round_, train.rounds, train.lr_schedule, train.lr_floor)
    gen = generator_for(ctx.cfg.seed, "client", round_, client.k, device=ctx.device)
    return local_train(ctx.model, start.to(ctx.device), client.loss(ctx.cfg, ctx.device), ctx.extract,
                       state=client.state, cfg=ctx.local_config(steps, lr), generator=gen)  # fmt: skip


def exact_stats(ctx: ClientContext, images: torch.Tensor, labels: torch.Tensor | None,
                num_classes: int) -> FeatureStats:  # fmt: skip
    """The exact statistics of `images` in the run's feature net, per class with `labels`."""
    return feature_stats(lambda x: ctx.extract(x.to(ctx.device)), images, labels=labels, num_classes=num_classes)


WARM_CHUNK = 100  # steps between the warm start's progress updates


def warm_start(ctx: ClientContext, steps: int, pooled: FeatureStats | None = None) -> tuple[bytes, dict]:
    """Round-0 global scores (train.warm_start): the seed's N(0, 1) scores, then `steps` Adam steps (at
    train.lr) of the run's matching loss against the exact statistics of
    the public hold-out (no client holds them: no privacy cost) or, without one, against `pooled`, the
    federation's pooled statistics (the sum of the clients' releases: with privacy, post-processing of
    them); every draw from the run's "warm-start" stream. Computed once, at the server (on Flower, a public
    warm start at the node with partition-id 0, which holds the hold-out), and broadcast to the clients
    as the full state of round 0. Returns the scores as a wire state message of round 0, and what was
    done (for the model's info)."""
    cfg = ctx.cfg
    idx = ctx.fed.public_idx if ctx.fed is not None else ()  # (a server's context holds no data)
    classes = cfg.arch_spec().codes
    if len(idx):
        labels = ctx.fed.labels(idx) if classes else None
        stats, source = exact_stats(ctx, ctx.fed.images(idx), labels, classes), "public"
    elif pooled is not None:
        stats, source = pooled, "pooled"
    else:
        raise PrismError("train.warm_start needs the public hold-out or the clients' pooled statistics")
    loss = client_loss(cfg, stats, ctx.device)
    scores = initial_scores(cfg, ctx.num_weights).to(ctx.device)
    state, gen = ClientState(), generator_for(cfg.seed, "warm-start", device=ctx.device)
    value, t0 = float("nan"), time.perf_counter()
    what = f"{len(idx):,} public images" if source == "public" else f"the clients' pooled statistics ({stats.count:,})"
    bar = progress_bar(range(0, steps, WARM_CHUNK), desc=f"warm start on {what}", unit="x100 steps")
    for done in bar:
        chunk = done // WARM_CHUNK + 1
        result = local_train(ctx.model, scores, loss, ctx.extract, state=state,
                             cfg=ctx.local_config(min(WARM_CHUNK, steps - done), cfg.train.lr),
                             generator=gen)  # fmt: skip
        scores, value = result.scores, result.loss
        bar.set_postfix(loss=f"{value:.4f}")
        if chunk % 5 == 0:  # a line every 500 steps where no bar is drawn (logs, CI)
            progress_line(f"warm start: {done + WARM_CHUNK:,}/{steps:,} steps, loss {value:.4f}")
    info = {
        "steps": steps,
        "images": len(idx) if source == "public" else stats.count,
        "loss": value,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if source == "pooled":  # (a public warm start's record is as it always was)
        info["source"] = "the clients' pooled statistics"
    return wire.encode_state(scores.cpu(), round_=0, table_hash=ctx.table_hash), info


# ---- what travels at set-up where a run has no public images (on Flower for real; the simulator counts it)


STATS_FEATURES_LIMIT = 2**28  # the most values a decoded statistics message may expand to (per mean or var)


def statistics_message(stats: FeatureStats) -> bytes:
    """A client's feature statistics as it sends them for the warm start at the server: per layer its
    means in float32 and its variances in float16 (each tensor scaled by a power of two that keeps it in
    float16's range: 2**-11 of each variance, which the pooled variance keeps), per class only the rows
    of the codes it holds images of (class count not 0: the others are zero). Means stay float32: the
    pooled variance subtracts squared means, and features whose mean is far above their spread (a
    random class head's probabilities) would lose their variance to float16's rounding of the means.
    The simulator trains on what statistics_of_message decodes, as Flower's server does."""
    rows = None if stats.class_counts is None else stats.class_counts != 0

    def held(t: torch.Tensor) -> torch.Tensor:
        return (t if rows is None else t[rows]).float()

    scales, var = [], []
    for t in map(held, stats.var):
        peak = float(t.max()) if t.numel() else 0.0
        scale = 2.0 ** (math.frexp(peak)[1] - 15) if peak > 0 else 1.0  # t / scale < 2**15 < 65,504
        var.append((t / scale).half())
        scales.append(scale)
    tree = {"mean": [held(t) for t in stats.mean], "var": var, "var_scale": torch.tensor(scales), "count": stats.count}
    if stats.class_counts is not None:
        tree["class_counts"] = stats.class_counts
    return safestate.to_bytes(tree)


def statistics_of_message(blob: bytes, codes: int) -> FeatureStats:
    """The FeatureStats a statistics_message carries, for a run of `codes` codes per class (0: not
    conditional), checked before anything is expanded: a StateError (or ValueError) for bytes that are
    not such a message, the FeatureStats schema's checks after."""
    layers = "a list of {} tensors{}, one per feature layer"
    fields = {
        "mean": schema.List(schema.Tensor(torch.float32, None), min_len=1, what=layers.format("float32", "")),
        "var": schema.List(
            schema.Tensor(torch.float16, None, lo=0.0), min_len=1, what=layers.format("float16", " >= 0")
        ),
        "var_scale": schema.Tensor(torch.float32, (None,), lo=2.0**-149),
        "count": schema.Int(0, 2**53, what="an image count (an int >= 0)"),
    }
    if codes:
        fields["class_counts"] = schema.Tensor(torch.float64, (codes,))
    tree = safestate.from_bytes(blob, "statistics")
    schema.check(schema.Table(fields, what="feature statistics (a table)"), tree, "statistics message")
    if not (len(tree["var"]) == len(tree["var_scale"]) == len(tree["mean"])):
        raise ValueError("statistics message: as many variances and scales as means, one per layer")
    present = None if not codes else tree["class_counts"] != 0
    rows = None if present is None else int(present.sum())
    if rows == 0:
        raise ValueError("statistics message: no class with images")
    for m, v in zip(tree["mean"], tree["var"]):
        if m.shape != v.shape or m.dim() != (1 if rows is None else 2) or (rows is not None and m.shape[0] != rows):
            raise ValueError("statistics message: each layer's means and variances of one shape, a row per "
                             "class with images")  # fmt: skip
    if sum(m.shape[-1] for m in tree["mean"]) * max(codes, 1) > STATS_FEATURES_LIMIT:
        raise ValueError(f"statistics message: more than {STATS_FEATURES_LIMIT:,} values")

    def full(t: torch.Tensor) -> torch.Tensor:
        if present is None:
            return t
        return torch.zeros(codes, t.shape[1]).index_put_((present.nonzero()[:, 0],), t)

    expanded = {"mean": [full(m) for m in tree["mean"]],
                "var": [full(v.float() * s) for v, s in zip(tree["var"], tree["var_scale"].tolist())],
                "count": tree["count"]}  # fmt: skip
    if codes:
        expanded["class_counts"] = tree["class_counts"]
    return FeatureStats.from_tree(expanded, None, codes or None, where="statistics message")


def moments_message(sums: dict) -> bytes:
    """A client's moment sums (data/modes.py moment_sums) as it sends them for the federation's modes:
    float64, only the classes it holds images of, each outer product's lower triangle (moment_sums makes
    it symmetric): exactly the sums, in about a fifth of the bytes for four classes of ten."""
    present = sums["counts"] != 0
    low = np.tril_indices(sums["sums"].shape[1])
    tree = {"counts": sums["counts"], "sums": sums["sums"][present], "outer": sums["outer"][present][:, low[0], low[1]]}
    return safestate.to_bytes({key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in tree.items()})


def released_moments(cfg: RunConfig, fed, k: int) -> dict:
    """What client k sends for the federation's modes (model.modes without public images): its exact
    moment sums (data/modes.py), or under privacy their Gaussian release (privacy.private_moment_sums, at
    the noise the run's budget gives the moments)."""
    from prismfl.privacy import private_moment_sums

    plan = budget(cfg)
    if plan is None:
        return fed.moments(k)
    idx = fed.parts[k]
    return private_moment_sums(fed.train.images[idx], fed.train.labels[idx], fed.num_classes, plan.z("moments"),
                               scale=1 / 255)  # fmt: skip


def federation_modes(cfg: RunConfig, released: list[dict], shape: tuple[int, int, int]):
    """The modes the server fits on the clients' released moment sums (of images of `shape`), added up
    in client order."""
    from prismfl.data.modes import principal_modes, sum_moments

    return principal_modes(sum_moments(released), cfg.model.modes, shape)


def moments_of_message(blob: bytes, num_classes: int, d: int, private: bool = False) -> dict:
    """The moment sums a moments_message carries, as moment_sums wrote them, checked (data/modes.py
    check_moments; `private`: a noisy release); a StateError or ValueError for bytes that are not such a
    message."""
    from prismfl.data.modes import check_moments

    tree = safestate.from_bytes(blob, "moment sums")
    if not (isinstance(tree, dict) and sorted(tree) == ["counts", "outer", "sums"]
            and all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in tree.values())):  # fmt: skip
        raise ValueError("moment sums must be a table of float64 counts, sums and outer")
    counts = tree["counts"].numpy()
    if counts.shape != (num_classes,) or not np.isfinite(counts).all():
        raise ValueError(f"moment counts must be {num_classes} finite numbers")
    present = counts != 0
    rows, tri = int(present.sum()), d * (d + 1) // 2
    if tree["sums"].shape != (rows, d) or tree["outer"].shape != (rows, tri):
        raise ValueError(f"moment sums and outer must be ({rows}, {d}) and ({rows}, {tri}): a row per class "
                         "with images")  # fmt: skip
    sums, outer = np.zeros((num_classes, d)), np.zeros((num_classes, d, d))
    low = np.tril_indices(d)
    sums[present] = tree["sums"].numpy()
    block = np.zeros((rows, d, d))
    block[:, low[0], low[1]] = tree["outer"].numpy()
    block[:, low[1], low[0]] = tree["outer"].numpy()
    outer[present] = block
    return check_moments({"counts": counts.copy(), "sums": sums, "outer": outer}, num_classes, d, private)


def modes_message(modes) -> bytes:
    """The modes the server fitted, as it sends them to every client in the setup message."""
    return safestate.to_bytes({key: torch.from_numpy(value) for key, value in modes.to_arrays().items()})
