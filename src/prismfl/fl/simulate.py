"""The in-process simulator: every client and the server in one process, rounds in a loop.

It only moves data: clients produce masks (fl.client), the codec packs them into the bytes that
would travel, the server aggregates (fl.server). Every round is checkpointed atomically; a killed
run resumed with --resume ends in the same state as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prismfl import modelfile, report, runio
from prismfl.config import BASELINES, RunConfig, config_from_dict
from prismfl.data.partition import format_class_table
from prismfl.errors import PrismError
from prismfl.eval.report import quick_fid
from prismfl.fl import codec, server, task, wire
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.fl.protocol import catch_up_bytes, client_upload, server_round
from prismfl.model import masked
from prismfl.modelfile import PrismModel
from prismfl.progress import bar as progress_bar

CHECKPOINT_VERSION = 1


@dataclass
class RoundRecord:
    round: int
    loss: float
    start_loss: float
    lam: float | None
    upload_bytes: int
    download_bytes: int
    bits_per_param: float
    entropy_bound_bits_per_param: float
    broadcast_bytes: int
    seconds: float
    client_seconds: float
    clients: list[int]
    mask_entropy: float
    epsilon: float | None  # privacy spent per client (one release at the start); None without privacy
    domain_fid: float | None = None  # quick domain FID of the round's model, every train.eval_every rounds

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["lambda"] = d.pop("lam")
        return d


def due(every: int, rnd: int, last: int) -> bool:
    """Whether a periodic task (every `every` rounds, 0 = never) runs after round `rnd`; always after the last."""
    return bool(every) and (rnd % every == 0 or rnd == last)


def mada_on(cfg: RunConfig) -> bool:
    """Whether the server blends with MADA (method prism-nomada is the paper's PRISM-dagger, without it)."""
    return cfg.train.mada and cfg.train.method == "prism"


def final_mask(cfg: RunConfig, scores: torch.Tensor) -> torch.Tensor:
    """The exported model's mask: the most likely mask (keep a weight where its global probability > 1/2;
    domain FID 163 against 181 for a sampled mask in docs/quality.md), or one Bernoulli(sigmoid(scores))
    draw from the run seed (`train.final_mask = "sample"`, as the paper's models)."""
    if cfg.train.final_mask == "mode":
        return scores.cpu() > 0
    return server.sample_mask(scores.cpu(), task.generator_for(cfg.seed, "final-mask"))


def export_model(cfg: RunConfig, scores: torch.Tensor, rounds_done: int, extra: dict | None = None) -> PrismModel:
    info = {
        "dataset": cfg.data.dataset,
        "rounds": rounds_done,
        "clients": cfg.partition.num_clients,
        "partition": cfg.partition.scheme,
        **(extra or {}),
    }
    return PrismModel(task.arch_spec(cfg), final_mask(cfg, scores), info)


def binary_entropy_bits(scores: torch.Tensor) -> float:
    """Mean entropy (bits/weight) of Bernoulli(sigmoid(scores)): the floor for coding a sampled mask."""
    p = torch.sigmoid(scores.double()).clamp(1e-12, 1 - 1e-12)
    return float((-(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))).mean())


def _check_out_dir(out: Path, cfg: RunConfig, resume: bool) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; writes nothing."""
    ckpt_path = out / runio.CHECKPOINT
    if resume:
        if not ckpt_path.exists():
            raise PrismError(f"--resume: no checkpoint in {out}; start a new run without --resume")
        state = runio.load_checkpoint(out)
        if state.get("version") != CHECKPOINT_VERSION:
            raise PrismError(f"{ckpt_path} was written by another prismfl version; start a new run")
        if state["config"] != cfg.to_dict():
            raise PrismError(f"--resume: the configuration differs from the one {out} was started with")
        if state.get("clients") is None:
            raise PrismError(f"{out} was trained on Flower, whose clients keep their own state: resume it there")
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrismError(f"{out} is not empty; choose a new --out, or add --resume to continue that run")
    return None


def start_run_dir(out: Path, cfg: RunConfig, fed, log=print) -> None:
    """Create a run directory with its resolved config and the client x class table."""
    out.mkdir(parents=True, exist_ok=True)
    runio.atomic_write_bytes(out / runio.CONFIG, report.config_toml(cfg.to_dict()).encode())
    table = format_class_table(fed.table, fed.class_names)
    runio.atomic_write_bytes(out / "partition.txt", (table + "\n").encode())
    log(f"{cfg.partition.num_clients} clients, '{cfg.partition.scheme}' partition of {fed.train.source}:")
    log(table)


def finish_run(out: Path, cfg: RunConfig, scores: torch.Tensor, model_info: dict, log=print) -> None:
    """Export the final model and draw its samples and the training curves."""
    final = export_model(cfg, scores, cfg.train.rounds, model_info)
    size = modelfile.save(final, out / runio.MODEL)
    report.sample_grid(final, out / "samples.png")
    report.curves(runio.read_metrics(out), out / "curves.png")
    report.run_report(out)
    log(f"done: {out / runio.MODEL} ({size:,} bytes); samples.png, curves.png and report.md in {out}")


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, log=print) -> Path:
    """Run (or continue) a federated training job and write its run directory."""
    if cfg.train.method in BASELINES:
        from prismfl.fl.baselines import train_baseline

        return train_baseline(cfg, out, resume=resume, log=log)
    mada = mada_on(cfg)
    out = Path(out)
    state = _check_out_dir(out, cfg, resume)
    device = task.resolve_device(cfg.train.device)
    fed = task.prepare_federation(cfg)  # bad data fails here, before anything is written
    extract_net, feature_meta = task.build_feature_net(cfg, fed, device, log)
    extract = extract_net.extract
    model = task.build_model(cfg, device)
    n = masked.num_maskable(model)
    if state is None:  # each client computes (and, with privacy on, privatises) its statistics once
        clip = None if math.isinf(cfg.privacy.epsilon) else task.privacy_clip(cfg, fed, extract, device)
        released = [
            task.client_statistics(cfg, extract, fed.client_images(k), clip, device)
            for k in progress_bar(range(cfg.partition.num_clients), desc="client statistics")
        ]
    else:  # never recomputed: a private release is made once, and its noise is not reproducible
        released = state["client_stats"]
    losses = [task.client_loss(cfg, stats, device) for stats, _ in released]
    privacy = released[0][1] and {k: v for k, v in released[0][1].items() if k != "clip"}
    if privacy:
        log(f"privacy: each client's statistics released once with epsilon={privacy['epsilon']:.3f}, "
            f"delta={privacy['delta']:g} (noise std {privacy['noise_std']:.2f} in clipped units)")  # fmt: skip
    if state is None:  # nothing is written before the data, feature net and privacy check out
        start_run_dir(out, cfg, fed, log)
    local_cfg = LocalConfig(cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr)

    table_hash = wire.layer_table_hash(masked.layer_table(model))
    state_size = wire.HEADER.size + 4 * n  # a float32 broadcast of the full scores
    if state is None:
        scores = task.initial_scores(cfg, n)  # every client derives round 0 from the run seed: 0 bytes
        clients = [ClientState() for _ in range(cfg.partition.num_clients)]
        synced = [0] * cfg.partition.num_clients  # the last round whose global scores each client holds
        delta_sizes: dict[int, int] = {}
        start = 1
        runio.truncate_metrics(out, 0)
    else:
        scores = state["global_scores"]
        clients = [ClientState.from_state_dict(s, cfg.loss.tracker_lr) for s in state["clients"]]
        synced, delta_sizes = state["synced"], state["delta_sizes"]
        start = state["round"] + 1
        runio.truncate_metrics(out, state["round"])
        log(f"resuming {out} after round {state['round']}")

    log(f"model: {cfg.model.arch}, {n:,} maskable weights ({codec.packed_size(n):,} bytes as packed bits)")
    bar = progress_bar(range(start, cfg.train.rounds + 1), desc="rounds", unit="round", leave=True,
                       initial=start - 1, total=cfg.train.rounds)  # fmt: skip
    for rnd in bar:
        t_round = time.perf_counter()
        chosen = task.select_clients(cfg, rnd)
        down = 0
        for k in chosen:  # each client first catches up to the current global scores
            down += catch_up_bytes(synced[k], rnd - 1, delta_sizes, state_size) if cfg.train.broadcast == "delta" \
                else state_size  # fmt: skip
            synced[k] = rnd - 1
        uploads: list[bytes] = []
        client_losses, start_losses, client_seconds = [], [], 0.0
        on_device = scores.to(device)
        for k in progress_bar(chosen, desc=f"round {rnd} clients"):
            t0 = time.perf_counter()
            gen = task.generator_for(cfg.seed, "client", rnd, k, device=device)
            result = local_train(model, on_device, losses[k], extract, clients[k], local_cfg, gen)
            uploads.append(client_upload(result.mask, scores, round_=rnd, table_hash=table_hash,
                                         coder=cfg.train.upload_coder))  # fmt: skip
            client_losses.append(result.loss)
            start_losses.append(result.start_loss)
            client_seconds += time.perf_counter() - t0
        outcome = server_round(
            scores, uploads, round_=rnd, table_hash=table_hash, smoothing=cfg.train.smoothing,
            mada=mada, rng=task.generator_for(cfg.seed, "mada", rnd),
        )  # fmt: skip
        scores, lam = outcome.scores, outcome.lam
        delta_sizes[rnd] = len(outcome.broadcast)
        record = round_record(rnd, n, chosen, uploads, outcome, client_losses, start_losses, down,
                              time.perf_counter() - t_round, client_seconds, privacy)  # fmt: skip
        checkpoint = round_checkpoint(cfg, rnd, scores, [c.state_dict() for c in clients], synced, delta_sizes,
                                      released, {"feature_net": feature_meta, "privacy": privacy})  # fmt: skip
        save_round(out, cfg, record, checkpoint, scores)
        bar.set_postfix(loss=f"{record.loss:.4f}", lam=f"{lam:.3f}" if lam is not None else "-")

    finish_run(out, cfg, scores, {"feature_net": feature_meta, "privacy": privacy}, log)
    return out


def export_run(run_dir: str | Path) -> PrismModel:
    """The model of a run directory's latest checkpoint (the same bytes train() wrote at the end)."""
    state = runio.load_checkpoint(Path(run_dir))
    cfg = config_from_dict(state["config"])
    return export_model(cfg, state["global_scores"], state["round"], state.get("model_info"))


# ---------------------------------------------------------------- one round's records, shared with the Flower server


def round_record(rnd: int, n: int, clients: list[int], uploads: list[bytes], outcome, losses: list[float],
                 start_losses: list[float], down: int, seconds: float, client_seconds: float,
                 privacy: dict | None) -> RoundRecord:  # fmt: skip
    """The metrics.jsonl record of a round whose `uploads` came from `clients` (in that order)."""
    up = sum(len(u) for u in uploads)
    return RoundRecord(
        round=rnd,
        loss=float(np.mean(losses)),
        start_loss=float(np.mean(start_losses)),
        lam=outcome.lam,
        upload_bytes=up,
        download_bytes=down,
        bits_per_param=8 * up / (n * len(clients)),
        entropy_bound_bits_per_param=outcome.entropy_bound_bits / (n * len(clients)),
        broadcast_bytes=len(outcome.broadcast),
        seconds=seconds,
        client_seconds=client_seconds,
        clients=clients,
        mask_entropy=binary_entropy_bits(outcome.scores),
        epsilon=privacy["epsilon"] if privacy else None,
    )


def round_checkpoint(cfg: RunConfig, rnd: int, scores: torch.Tensor, clients: list[dict] | None, synced: list,
                     delta_sizes: dict[int, int], client_stats: list | None, model_info: dict) -> dict:  # fmt: skip
    """What checkpoint.pt holds after a round (clients and client_stats are None where they live on the
    clients, as with Flower: such a checkpoint exports and samples, but the simulator cannot resume it)."""
    return {
        "version": CHECKPOINT_VERSION, "round": rnd, "config": cfg.to_dict(),
        "global_scores": scores, "clients": clients,
        "synced": synced, "delta_sizes": delta_sizes, "client_stats": client_stats,
        "model_info": model_info,
    }  # fmt: skip


def save_round(out: Path, cfg: RunConfig, record: RoundRecord, checkpoint: dict, scores: torch.Tensor,
               extra: dict | None = None) -> None:  # fmt: skip
    """After a round: the periodic quick FID, the checkpoint, the metrics line (plus `extra` keys), a sample grid."""
    rnd = record.round
    if due(cfg.train.eval_every, rnd, cfg.train.rounds):
        record.domain_fid = quick_fid(modelfile.materialize(export_model(cfg, scores, rnd)), cfg.data.dataset)
    runio.save_checkpoint(out, checkpoint)
    runio.append_metrics(out, {**record.to_dict(), **(extra or {})})
    if cfg.train.sample_every and rnd % cfg.train.sample_every == 0 and rnd < cfg.train.rounds:
        report.sample_grid(export_model(cfg, scores, rnd), out / "samples" / f"round-{rnd:04d}.png")
