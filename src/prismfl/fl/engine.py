"""The one round loop, for every method and both transports.

    setup (the transport builds or restores its clients) -> for each round:
        method.plan -> transport.exchange (messages down, uploads back) -> method.decode each upload
        -> method.aggregate -> record, checkpoint, metrics line, sample grid every sample_every rounds
    -> method.export, samples.png, curves.png, report.md

A transport only moves bytes: `fl.simulate.InProcess` calls the clients in this process,
`flower.server_app.GridTransport` sends Flower messages to SuperNodes. A run is resumed from its
checkpoint the same way whichever transport wrote it (with the same transport).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from prismfl import bits, plots, rundir, runreport
from prismfl.config import RunConfig
from prismfl.data.partition import format_class_table
from prismfl.errors import PrismError
from prismfl.fl import wire
from prismfl.fl.methods import registry as methods
from prismfl.fl.methods.base import Downlink, Method, Upload
from prismfl.progress import bar as progress_bar
from prismfl.progress import line as progress_line
from prismfl.progress import visible as progress_visible
from prismfl.safestate import StateError


@dataclass
class Setup:
    """What the server learns from setting up the clients."""

    num_weights: int
    table_hash: int
    class_table: np.ndarray  # clients x classes
    class_names: list[str]
    source: str  # where the training data came from
    feature_meta: dict  # what the loss's feature net was trained on
    privacy: dict | None  # the release's parameters (without the clip bounds), None without privacy
    class_counts: list[float] | None = None  # conditional models: the clients' statistics' class counts, summed
    client_counts: dict[int, list[float]] | None = None  # and each client's own (`local` exports a model each)
    # fresh runs only: privacy.pool: each client's released noisy sums; privacy.secagg: each client's
    # public key and vector layout for secure aggregation
    shared: dict[int, dict] | None = None
    # fresh runs with train.warm_start only: the round-0 global scores trained on the public hold-out, as a
    # wire state message (decoded and checked like any message), and what the warm start did
    warm_start: bytes | None = None
    warm_info: dict | None = None
    # privacy.secagg with privacy.shrink_to = "public": the public hold-out's clipped statistics that the
    # server shrinks the secure sum toward (privacy.public_target; checked before use)
    shrink_target: dict | None = None
    # partitions that take no part (on Flower: their SuperNode was dropped at set-up); a round that
    # chooses one lists it under failures
    absent: list[int] = field(default_factory=list)
    # the set-up's payload bytes where a run has no public images: up, the clients' moment sums (model.modes)
    # and feature statistics (the warm start at the server); down, the modes sent back to every client
    setup_traffic: dict = field(default_factory=lambda: {"up": 0, "down": 0})


class Transport(Protocol):
    name: str  # written into the checkpoint: a run resumes on the transport that wrote it
    min_replies: int  # a round needs at least this many good uploads (at most the clients contacted)

    def setup(self, method: Method, checkpoint: dict | None, log) -> Setup: ...

    def exchange(self, rnd: int, downlinks: dict[int, Downlink]) -> tuple[dict[int, Upload], list[dict]]:
        """Send each client its downlink; return the uploads that came back and the failures
        ({"client": k, "error": why}) of those that did not."""
        ...

    def client_states(self) -> dict | None:
        """The clients' states for the checkpoint, where this process holds them (else None)."""
        ...

    def share_pool(self, pooled) -> None:
        """Give every client the pooled statistics (privacy.pool): each mixes them into its targets."""
        ...

    def secagg_exchange(self, stage: str, requests: dict[int, dict]) -> tuple[dict[int, dict], dict[int, str]]:
        """Secure aggregation (privacy.secagg): send each client its request of one stage of the secure sum
        (secagg.SecAggServer.requests); return the replies that came back, by client, and why the others
        sent none."""
        ...


def run(cfg: RunConfig, out: str | Path, transport: Transport, *, resume: bool = False, log=print,
        on_round=None, quick_fid=None) -> Path:  # fmt: skip
    """Run (or continue) a job and write its run directory; `on_round(rnd, state)` after every round.
    `quick_fid(net, dataset) -> float` scores the model every train.eval_every rounds (the caller passes
    eval.evaluate.quick_fid: the engine sits below the evaluation and does not import it)."""
    if cfg.train.eval_every and quick_fid is None:
        raise PrismError("train.eval_every needs an evaluator: this caller passes no quick_fid to the engine")
    out = Path(out)
    method = methods.build(cfg)
    ckpt = rundir.check(out, cfg, resume=resume, transport=transport.name)
    setup = transport.setup(method, ckpt, log)  # bad data fails here, before anything is written
    model_info = {"method": cfg.train.method, "feature_net": setup.feature_meta, "privacy": setup.privacy}
    if setup.privacy and setup.privacy.get("secagg"):
        p = setup.privacy
        log(f"privacy: the clients' summed statistics released once with epsilon={p['epsilon']:.3f}, "
            f"delta={p['delta']:g}, by secure aggregation with distributed noise (each client adds std "
            f"{p['client_noise_std']:.2f}, the sum carries >= {p['noise_std']:.2f}, against up to "
            f"{p['colluders']} colluding clients"
            + (f", with up to {cfg.partition.num_clients - p['min_survivors']} of the {cfg.partition.num_clients} "
               "clients dropping out" if "min_survivors" in p else "") + ")")  # fmt: skip
    elif setup.privacy:
        p = setup.privacy
        log(f"privacy: each client's statistics released once with epsilon={p['epsilon']:.3f}, "
            f"delta={p['delta']:g} (noise std {p['noise_std']:.2f} in clipped units)")  # fmt: skip
    if ckpt is None:
        rundir.start(out, cfg, format_class_table(setup.class_table, setup.class_names), setup.source, log)
        pooled = pool_statistics(cfg, method, setup, transport, log) if cfg.privacy.pool > 0 else None
        state, records, start = method.init_state(setup.num_weights, setup.table_hash), [], 1
        if setup.setup_traffic["up"] or setup.setup_traffic["down"]:
            model_info["setup_traffic"] = dict(setup.setup_traffic)
            log(f"set-up traffic: {setup.setup_traffic['up'] / 1e6:.2f} MB up (the clients' moment sums and "
                f"statistics), {setup.setup_traffic['down'] / 1e6:.2f} MB down (the modes)")  # fmt: skip
        if cfg.train.warm_start and method.warm_starts and warm_start(method, state, setup, log):
            # (its time stays in the log: a model file is the same bytes whoever trained it, however fast)
            model_info["warm_start"] = {k: v for k, v in (setup.warm_info or {}).items() if k != "seconds"}
        if method.spec.num_classes:
            counts = setup.class_counts
            if counts is None and pooled is not None:  # secagg: the class counts of the secure sum
                counts = pooled.class_counts.tolist()
            state["class_shares"] = class_shares(counts, method.spec.codes)
            if method.own_class_shares:  # a model per client, drawing the classes it holds in their shares
                own = setup.client_counts or {}  # (a client that reported none: the federation's shares)
                state["client_shares"] = [class_shares(own[k], method.spec.codes) if k in own else
                                          state["class_shares"] for k in range(cfg.partition.num_clients)]  # fmt: skip
    else:
        check_feature_net(ckpt["model_info"].get("feature_net"), setup.feature_meta)
        state, records, start = ckpt["server"], ckpt["records"], ckpt["round"] + 1
        for key in ("warm_start", "setup_traffic"):
            if key in ckpt["model_info"]:
                model_info[key] = ckpt["model_info"][key]
        method.check_state(state, setup.num_weights, setup.table_hash, ckpt["round"])  # (the simulator: again)
        if ckpt["clients"] is None:  # the clients kept their own state, and have started afresh since
            method.clients_restarted(state)
        rundir.write_metrics(out, records)
        log(f"resuming {out} after round {ckpt['round']}")
    n = setup.num_weights
    log(f"method {cfg.train.method}: {cfg.model.arch} generator, {n:,} weights "
        f"({bits.packed_size(n):,} bytes as packed bits)")  # fmt: skip
    sizes = setup.class_table.sum(axis=1).tolist()
    rounds = cfg.train.rounds
    bar = progress_bar(range(start, rounds + 1), desc=f"{cfg.train.method} rounds", unit="round", leave=True,
                       initial=start - 1, total=rounds)  # fmt: skip
    for rnd in bar:
        t_round = time.perf_counter()
        plan = method.plan(state, rnd)
        replies, failures = transport.exchange(rnd, plan.downlinks)
        uploads = {}
        for k in sorted(replies):
            try:
                uploads[k] = (replies[k].data, method.decode(state, rnd, k, replies[k].data))
            except wire.WireError as exc:
                failures.append({"client": k, "error": f"upload rejected: {type(exc).__name__}: {exc}"})
        failures += reject_duplicates(uploads)
        for failure in failures:
            method.client_lost(state, failure["client"])
            log(f"round {rnd}: client {failure['client']} left out ({failure['error']})")
        needed = min(transport.min_replies, len(plan.downlinks))
        if len(uploads) < needed:
            rundir.append_metrics(out, {"round": rnd, "aborted": True, "failures": failures, "replies": len(uploads),
                                        "min_replies": needed})  # fmt: skip
            raise PrismError(f"round {rnd}: {len(uploads)} good uploads of {len(plan.downlinks)}, fewer than "
                             f"min-replies = {needed}; the run stops (last complete round {rnd - 1}; "
                             "see metrics.jsonl)")  # fmt: skip
        outcome = method.aggregate(state, rnd, uploads, sizes)
        failed = {f["client"] for f in failures}
        clients = [k for k in plan.clients if k not in failed]
        used = sorted(uploads)
        record = rundir.RoundRecord(
            round=rnd,
            loss=float(np.mean([replies[k].loss for k in used])),
            start_loss=float(np.mean([replies[k].start_loss for k in used])),
            lam=outcome.lam,
            upload_bytes=outcome.upload_bytes,
            download_bytes=plan.download_bytes,
            bits_per_param=8 * outcome.upload_bytes / (n * len(clients)),
            entropy_bound_bits_per_param=outcome.entropy_bound_bits / (n * len(clients)),
            broadcast_bytes=outcome.broadcast_bytes,
            seconds=time.perf_counter() - t_round,
            client_seconds=sum(replies[k].seconds for k in used),
            clients=clients,
            mask_entropy=outcome.mask_entropy,
            epsilon=setup.privacy["epsilon"] if setup.privacy else None,
        )
        if rundir.due(cfg.train.eval_every, rnd, rounds):
            record.domain_fid = float(np.mean([quick_fid(net, cfg.data.dataset) for net in method.nets(state)]))
        extra = {"failures": failures} if failures else {}
        if outcome.rejected:
            extra["rejected"] = outcome.rejected
        records.append({**record.to_dict(), **extra})
        rundir.save_checkpoint(out, round_=rnd, cfg=cfg, transport=transport.name, server=state,
                               clients=transport.client_states(), records=records, model_info=model_info)  # fmt: skip
        rundir.append_metrics(out, records[-1])
        if cfg.train.sample_every and rnd % cfg.train.sample_every == 0 and rnd < rounds:
            plots.save_grid(method.sample_images(state), out / "samples" / f"round-{rnd:04d}.png", nrow=8)
        lam = "-" if outcome.lam is None else f"{outcome.lam:.3f}"
        if progress_visible():
            bar.set_postfix(loss=f"{record.loss:.4f}", lam=lam)
        else:
            progress_line(f"round {rnd}/{rounds}: loss {record.loss:.4f}, lambda {lam}, {len(clients)} clients, "
                          f"{record.upload_bytes:,} bytes up, {record.seconds:.1f} s")  # fmt: skip
        if on_round is not None:
            on_round(rnd, state)

    what = method.export(state, out, rounds, model_info)
    plots.save_grid(method.sample_images(state), out / "samples.png", nrow=8)
    plots.curves(records, out / "curves.png")
    runreport.run_report(out)
    log(f"done: {what}; samples.png, curves.png and report.md in {out}")
    return out


def check_feature_net(before: dict | None, now: dict) -> None:
    """A resumed run must train with the feature net it started with: the clients' statistics (kept in
    the checkpoint) are of that net. A PrismError when the trained net's sha256 has changed since (its
    cache entry was deleted and retrained, which is not bit-reproducible, or prismfl now ships it)."""
    old = before.get("sha256") if isinstance(before, dict) else None
    if old and now.get("sha256") and old != now["sha256"]:
        raise PrismError(f"this run started with another feature net (sha256 {str(old)[:12]}, now "
                         f"{now['sha256'][:12]}): its statistics belong to that net, so it cannot be resumed "
                         "with this one; start it again (without --resume) or in another directory")  # fmt: skip


def warm_start(method: Method, state: dict, setup: Setup, log) -> bool:
    """train.warm_start: round 1 starts from the scores the transport trained (on the public hold-out or
    the clients' pooled statistics). False when there are none because partition 0 was dropped."""
    if setup.warm_start is None and 0 in setup.absent:
        log("warm start: none (partition 0, which trains it, was dropped at set-up); round 1 starts from the "
            "seed's scores")  # fmt: skip
        return False
    if setup.warm_start is None:
        raise PrismError("train.warm_start is set but the transport brought no warm-start scores")
    try:
        method.warm_start(state, setup.warm_start)
    except wire.WireError as exc:
        raise PrismError(f"the warm-start scores do not decode: {type(exc).__name__}: {exc}") from None
    info = setup.warm_info or {}
    on = info.get("source", f"{info.get('images', 0):,} public images")
    log(f"warm start: {info.get('steps', 0):,} steps on {on} "
        f"(loss {info.get('loss', float('nan')):.4f}, {info.get('seconds', 0.0):.0f} s); every client gets "
        "these scores as the full state of round 0")  # fmt: skip
    return True


def pool_statistics(cfg: RunConfig, method: Method, setup: Setup, transport: Transport, log):
    """privacy.pool: sum the clients' private releases into pooled statistics (post-processing), or
    with privacy.secagg learn only their secure sum; send the pooled statistics back to every client,
    which mixes them into its own targets. Returns them."""
    from prismfl import privacy

    if not setup.shared:
        raise PrismError("privacy.pool is set but no client shared its statistics")
    if cfg.privacy.secagg:
        pooled = secure_sum(method, setup, transport, log)
    else:
        try:
            pooled = privacy.pool_releases(setup.shared, num_classes=method.spec.codes,
                                           min_count=privacy.min_count(setup.privacy))  # fmt: skip
        except ValueError as exc:
            raise PrismError(f"pooling the clients' statistics: {exc}") from None
    transport.share_pool(pooled)
    p = cfg.privacy
    what = f"{len(setup.shared)} clients' " + ("secure sum" if p.secagg else "releases")
    if method.spec.num_classes:
        what += f" (per class; pooled counts {', '.join(f'{float(c):.0f}' for c in pooled.class_counts)})"
    how = "the pooled statistics alone" if p.pool == 1 else f"{p.pool:g} x pooled + {1 - p.pool:g} x its own"
    if method.spec.num_classes:
        how += " over every class" if p.pool_classes == "all" else " over the classes it holds"
    log(f"privacy: pooled {what}; each client trains against {how}")
    return pooled


def secure_sum(method: Method, setup: Setup, transport: Transport, log):
    """Secure aggregation (prismfl/secagg.py): run the server's side of the secure sum over the transport
    (shares, masked vectors, unmasking) and decode the sum of the vectors of the clients that took part to
    the end into the statistics of the noisy sum. Clients may drop out, up to privacy.dropouts; with more
    the run stops here, before any release."""
    import json

    from prismfl import privacy, secagg

    def agreed(key: str, what: str):
        """The one value every client sent under `key` (they must agree)."""
        if len({json.dumps(s.get(key)) for s in setup.shared.values()}) != 1:
            raise PrismError(f"the clients' secure-aggregation {what} differ")
        return next(iter(setup.shared.values())).get(key)

    t0 = time.perf_counter()
    layout = agreed("layout", "vector layouts")
    c = method.cfg
    server = None
    try:
        server = secagg.SecAggServer(setup.shared, layout, num_clients=c.partition.num_clients,
                                     dropouts=c.privacy.dropouts, colluders=c.privacy.colluders,
                                     table_hash=setup.table_hash)  # fmt: skip
        for stage in secagg.STAGES:
            replies, failures = transport.secagg_exchange(stage, server.requests(stage))
            server.take(stage, replies, failures)
        summed = server.result()
    except secagg.SecAggError as exc:
        lost = "; ".join(f"client {k}: {why}" for k, why in sorted(server.dropped.items())) if server else ""
        raise PrismError(f"secure aggregation: {exc}; the run stops before any release: start it again (every "
                         f"client then releases anew){f' ({lost})' if lost else ''}") from None  # fmt: skip
    for k, why in sorted(server.dropped.items()):
        log(f"secure aggregation: client {k} dropped out at {why}")
    survivors = len(server.survivors)
    if method.cfg.privacy.shrink:
        clip = secagg.check_clip(agreed("clip", "clip bounds"))
        if len(clip) != len(summed["sums"]):
            raise PrismError(f"{len(clip)} clip bounds for {len(summed['sums'])} feature layers")
        p = setup.privacy
        # the noise of the S vectors summed: S shares of sigma / sqrt(M - c) each
        sigma = p["noise_std"] * (survivors / (server.plan.min_survivors - p.get("colluders", 0))) ** 0.5
        target = None
        if method.cfg.privacy.shrink_to == "public":
            if setup.shrink_target is None:
                raise PrismError("privacy.shrink_to = 'public': the clients sent no public statistics to shrink toward")
            try:
                privacy.check_target(setup.shrink_target, summed)
            except StateError as exc:
                raise PrismError(f"privacy.shrink_to = 'public': {exc}") from None
            target = setup.shrink_target
        kept: dict = {}
        summed = privacy.shrink_sums(summed, sigma, clip, min_count=privacy.min_count(p), target=target, kept=kept)
        toward = "the public images' statistics" if target is not None else "each layer's average"
        log(f"privacy: the secure sum shrunk toward {toward}; it keeps on average "
            f"{np.mean(kept['means'] or [0]):.0%} of its means' and {np.mean(kept['seconds'] or [0]):.0%} of its "
            "second moments' departure from there (James-Stein, post-processing)")  # fmt: skip
    plan = server.plan
    graph = "every other client" if plan.half_degree is None else f"{2 * plan.half_degree} neighbours"
    log(f"secure aggregation: {survivors} of {len(server.ids)} clients summed ({graph} each, {plan.threshold} of "
        f"{plan.holders} shares rebuild a secret, at least {plan.min_survivors} needed), "
        f"{server.traffic['up']:,} bytes up, {server.traffic['down']:,} bytes down, "
        f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    return privacy.stats_of_sum(summed, method.spec.codes)


def class_shares(counts: list[float] | None, num_classes: int):
    """A conditional model's class shares (float64), from the class counts the clients reported."""
    import torch

    if counts is None or len(counts) != num_classes:
        raise PrismError(f"a conditional model needs the class counts of {num_classes} classes from its clients")
    total = torch.tensor(counts, dtype=torch.float64).clamp_min(0)
    if not float(total.sum()) > 0:
        raise PrismError("the clients reported no images of any class")
    return total / total.sum()


def reject_duplicates(uploads: dict[int, tuple[bytes, object]]) -> list[dict]:
    """Remove uploads whose payload is byte for byte another client's (a copied or replayed upload:
    two honest clients never draw the same mask or train the same weights); return their failures."""
    by_payload: dict[bytes, list[int]] = {}
    for k, (data, _) in uploads.items():
        by_payload.setdefault(hashlib.sha256(data[wire.HEADER.size :]).digest(), []).append(k)
    failures = []
    for clients in by_payload.values():
        if len(clients) > 1:
            for k in clients:
                del uploads[k]
                failures.append({"client": k, "error": f"upload rejected: the same payload as clients {clients}"})
    return failures


def run_model(run_dir: Path):
    """The mask model of a run directory's latest checkpoint (the bytes the run exported at the end)."""
    from prismfl.model.generators import count_weights

    state = rundir.load_checkpoint(run_dir)
    cfg = rundir.checkpoint_config(state)
    method = methods.build(cfg)
    method.check_state(state["server"], count_weights(cfg.arch_spec()))
    return method.final_model(state["server"], state["round"], state["model_info"])
