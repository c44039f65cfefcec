"""Baselines in the same harness as PRISM: same data, partition, loss, feature net, rounds and budget.

- fedavg: the same generator with ordinary float weights, trained locally and averaged (FedAvg,
  weighted by client size); every upload and broadcast is the float32 weights (32 bits per weight).
- local: every client trains its own PRISM model on its own data and never communicates.
- central: one PRISM model trained on all clients' data pooled, for as many steps as all clients
  together take in the federation (the upper bound).
(prism and prism-nomada are fl.simulate.train itself.)

Each writes the same run directory as the simulator: config, partition, metrics.jsonl (one record
per round), checkpoint, sample grid and curves; the models go to model.prism (masked methods),
models/client-K.prism (local) or model.pt (fedavg, float weights).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from prismfl import modelfile, report, runio
from prismfl.config import BASELINES, RunConfig
from prismfl.eval.report import quick_fid
from prismfl.fl import task, wire
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.fl.simulate import (
    CHECKPOINT_VERSION,
    RoundRecord,
    _check_out_dir,
    binary_entropy_bits,
    due,
    export_model,
    start_run_dir,
)
from prismfl.model import masked
from prismfl.progress import bar as progress_bar

DENSE_MODEL = "model.pt"


def train_baseline(cfg: RunConfig, out: str | Path, *, resume: bool = False, log=print) -> Path:
    method = cfg.train.method
    if method not in BASELINES:
        raise ValueError(f"{method} is not a baseline")
    out = Path(out)
    state = _check_out_dir(out, cfg, resume)
    device = task.resolve_device(cfg.train.device)
    fed = task.prepare_federation(cfg)
    extract_net, feature_meta = task.build_feature_net(cfg, fed, device, log)
    extract = extract_net.extract
    model = task.build_model(cfg, device)
    n = masked.num_maskable(model)
    if method == "fedavg":
        masked.make_dense(model, cfg.seed)
    k_clients = cfg.partition.num_clients
    if state is None:
        if method == "central":
            images = fed.images(np.sort(np.concatenate(fed.parts)))
            released = [task.client_statistics(cfg, extract, images, None, device)]
        else:
            released = [
                task.client_statistics(cfg, extract, fed.client_images(k), None, device)
                for k in progress_bar(range(k_clients), desc="client statistics")
            ]
        start_run_dir(out, cfg, fed, log)
    else:
        released = state["client_stats"]
    losses = [task.client_loss(cfg, stats, device) for stats, _ in released]
    lr = cfg.train.dense_lr if method == "fedavg" else cfg.train.lr
    sizes = np.array([len(p) for p in fed.parts], dtype=np.float64)

    n_models = 1 if method in ("fedavg", "central") else k_clients
    if state is None:
        init = masked.get_trainable(model) if method == "fedavg" else task.initial_scores(cfg, n)
        params = [init.clone() for _ in range(n_models)]
        clients = [ClientState() for _ in range(len(losses))]
        start = 1
        runio.truncate_metrics(out, 0)
    else:
        params, clients = state["params"], [ClientState.from_state_dict(s) for s in state["clients"]]
        start = state["round"] + 1
        runio.truncate_metrics(out, state["round"])
    dense_msg = wire.HEADER.size + 4 * n  # fedavg sends float32 weights each way
    log(f"baseline '{method}': {cfg.model.arch}, {n:,} weights")
    for rnd in progress_bar(range(start, cfg.train.rounds + 1), desc=f"{method} rounds", leave=True,
                            initial=start - 1, total=cfg.train.rounds):  # fmt: skip
        t_round = time.perf_counter()
        chosen = task.select_clients(cfg, rnd)
        steps = cfg.train.local_steps * (len(chosen) if method == "central" else 1)
        local_cfg = LocalConfig(steps, cfg.train.batch_size, lr)
        results, client_seconds = [], 0.0
        for k in [0] if method == "central" else chosen:
            t0 = time.perf_counter()
            which = k if method == "local" else 0
            gen = task.generator_for(cfg.seed, "client", rnd, k, device=device)
            res = local_train(model, params[which].to(device), losses[k], extract, clients[k], local_cfg, gen)
            if method == "local":
                params[k] = res.scores.cpu()
            results.append((k, res))
            client_seconds += time.perf_counter() - t0
        if method == "fedavg":  # FedAvg: size-weighted mean of the float weights
            w = sizes[[k for k, _ in results]]
            params[0] = sum(float(wk / w.sum()) * r.scores.cpu() for wk, (_, r) in zip(w, results))
        elif method == "central":
            params[0] = results[0][1].scores.cpu()
        up = dense_msg * len(chosen) if method == "fedavg" else 0
        record = RoundRecord(
            round=rnd,
            loss=float(np.mean([r.loss for _, r in results])),
            start_loss=float(np.mean([r.start_loss for _, r in results])),
            lam=None,
            upload_bytes=up,
            download_bytes=up,
            bits_per_param=8 * up / (n * len(chosen)),
            entropy_bound_bits_per_param=0.0,
            broadcast_bytes=dense_msg if method == "fedavg" else 0,
            seconds=time.perf_counter() - t_round,
            client_seconds=client_seconds,
            clients=chosen,
            mask_entropy=0.0 if method == "fedavg" else binary_entropy_bits(params[0]),
            epsilon=None,
        )
        if due(cfg.train.eval_every, rnd, cfg.train.rounds):
            fids = [quick_fid(net, cfg.data.dataset) for net in current_models(cfg, params)]
            record.domain_fid = float(np.mean(fids))
        runio.save_checkpoint(out, {
            "version": CHECKPOINT_VERSION, "round": rnd, "config": cfg.to_dict(), "params": params,
            "clients": [c.state_dict() for c in clients], "client_stats": released,
            "model_info": {"feature_net": feature_meta, "privacy": None, "method": method},
        })  # fmt: skip
        runio.append_metrics(out, record.to_dict())

    info = {"feature_net": feature_meta, "privacy": None, "method": method}
    if method == "fedavg":
        save_dense(out / DENSE_MODEL, cfg, params[0])
        report.save_grid(modelfile.sample(dense_generator(task.arch_spec(cfg), params[0]), 64), out / "samples.png")
    elif method == "central":
        final = export_model(cfg, params[0], cfg.train.rounds, info)
        modelfile.save(final, out / runio.MODEL)
        report.sample_grid(final, out / "samples.png")
    else:
        grids = []
        for k in range(k_clients):
            final = export_model(cfg, params[k], cfg.train.rounds, {**info, "client": k})
            modelfile.save(final, out / "models" / f"client-{k}.prism")
            grids.append(modelfile.sample(modelfile.materialize(final), 8, seed=0))
        report.save_grid(torch.cat(grids), out / "samples.png", nrow=8)
    report.curves(runio.read_metrics(out), out / "curves.png")
    report.run_report(out)
    log(f"done: {out}")
    return out


def save_dense(path: Path, cfg: RunConfig, weights: torch.Tensor) -> int:
    """The FedAvg model: float32 weights (safetensors) with the architecture in the metadata."""
    import json

    from safetensors.torch import save

    meta = {"arch": json.dumps(task.arch_spec(cfg).to_dict()), "dataset": cfg.data.dataset, "method": "fedavg"}
    data = save({"weights": weights.contiguous().float()}, metadata=meta)
    runio.atomic_write_bytes(path, data)
    return len(data)


def current_models(cfg: RunConfig, params: list[torch.Tensor]) -> list[torch.nn.Module]:
    """Ready-to-sample generators for the baseline's current parameters (one per client for 'local')."""
    if cfg.train.method == "fedavg":
        return [dense_generator(task.arch_spec(cfg), params[0])]
    return [modelfile.materialize(export_model(cfg, p, 0)) for p in params]


def dense_generator(spec, weights: torch.Tensor) -> torch.nn.Module:
    """A ready-to-sample dense generator, BatchNorm recalibrated the same way as a mask model's."""
    from prismfl.model.generators import build_generator, calibrate_batchnorm

    net = masked.make_dense(build_generator(spec), spec.weight_seed)
    masked.set_trainable(net, weights)
    calibrate_batchnorm(net, spec.weight_seed, n=modelfile.BN_SAMPLES)
    return net


def load_dense(path: Path) -> tuple[torch.nn.Module, dict]:
    """The FedAvg model file as a generator, with its metadata."""
    import json

    from safetensors import safe_open

    from prismfl.model.generators import ArchSpec

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        weights = f.get_tensor("weights")
    net = dense_generator(ArchSpec(**json.loads(meta["arch"])), weights)
    return net, {"dataset": meta["dataset"], "method": meta["method"], "bytes": path.stat().st_size}
