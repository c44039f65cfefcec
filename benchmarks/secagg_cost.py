"""The cost of secure aggregation (privacy.secagg): bytes and time per client and at the server, for
K clients and vectors of the sizes the demo's private configurations release (docs/privacy.md).

The whole secure sum (secagg.py) runs in this process, with privacy.dropouts = 0.3: once with every
client answering, once with 30% of them dropping after the key exchange (they send their shares, then
nothing). Each client: two X25519 key pairs at set-up; Shamir shares of its seed and mask key for its
holders, each sealed (X25519 + AES-GCM); its vector masked with its seed's expansion and one mask per
neighbour; the shares it holds, opened. The server: the sum of the masked vectors, the seeds and
dropped keys rebuilt, their masks taken off. Bytes are the payloads' (byte strings at their length,
integers 8 bytes each), the set-up's two public keys included; a client's seconds are those of its
three answers, the server's those of its three stages. Each figure is the best of `--repeats` runs.

Run:  .venv/bin/python benchmarks/secagg_cost.py --out docs/benchmarks/privacy/secagg-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from prismfl import secagg

# words of the release vector (sums, squares, counts) of the demo's conditional configurations: per class,
# 6,267 pooled features (49 + 2 x 1,568 + 2 x 1,024 + 2 x 512 + 10) and 1,325 more with 50 principal
# components (what the retired loss.pca = 50 added; the squares are sent as zeros with loss.moment = "mean")
SIZES = {"pool 4 (10 classes)": 10 * 2 * 6_267 + 10, "pool 4, pca 50 (10 classes)": 10 * 2 * 7_592 + 10}
DROPOUTS = 0.3


def measure(k: int, words: int, drop: bool, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    layout = [[words - 2], [1], [1]]
    m = secagg.min_survivors(k, DROPOUTS)
    clients = {i: secagg.SecAggClient(secagg.encode(torch.randn(words, generator=gen, dtype=torch.float64)), layout,
                                      min_survivors=m) for i in range(k)}  # fmt: skip
    # who drops is drawn apart from the ring (the same generator for both would cluster them on it)
    lost = set(random.Random(f"drop-{seed}").sample(range(k), k - m)) if drop else set()
    server = secagg.SecAggServer({i: c.public() for i, c in clients.items()}, layout, num_clients=k,
                                 dropouts=DROPOUTS, colluders=0, table_hash=0, rng=random.Random(seed))  # fmt: skip
    up = dict.fromkeys(clients, 2 * secagg.KEY_BYTES)  # the set-up's two public keys
    down, seconds, server_s = dict.fromkeys(clients, 0), dict.fromkeys(clients, 0.0), 0.0
    for stage in secagg.STAGES:
        t0 = time.perf_counter()
        requests = server.requests(stage)
        server_s += time.perf_counter() - t0
        replies = {}
        for i, request in requests.items():
            if stage != "shares" and i in lost:
                continue
            t0 = time.perf_counter()
            replies[i] = clients[i].answer(i, stage, request)
            seconds[i] += time.perf_counter() - t0
            down[i] += secagg.size_of(request)
            up[i] += secagg.size_of(replies[i])
        t0 = time.perf_counter()
        server.take(stage, replies)
        server_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    total = server.result()
    server_s += time.perf_counter() - t0
    want = sum(clients[i].words.view(np.int64).astype(object) for i in server.survivors)
    assert secagg.encode(secagg.flatten(total)[0]).view(np.int64).tolist() == list(want), "the sum is not exact"
    kept = [i for i in clients if i not in lost]  # per client: the mean over those that took part to the end
    plan = server.plan
    return {"clients": k, "dropped": len(lost), "words": words,
            "neighbours": k - 1 if plan.half_degree is None else 2 * plan.half_degree,
            "threshold": plan.threshold, "holders": plan.holders,
            "client_bytes_up": round(float(np.mean([up[i] for i in kept]))),
            "client_bytes_down": round(float(np.mean([down[i] for i in kept]))),
            "client_seconds": float(np.mean([seconds[i] for i in kept])), "server_seconds": server_s}  # fmt: skip


def best(k: int, words: int, drop: bool, repeats: int) -> dict:
    runs = [measure(k, words, drop, seed) for seed in range(repeats)]
    row = runs[0]
    for key in ("client_seconds", "server_seconds"):
        row[key] = round(min(r[key] for r in runs), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,50,200")
    p.add_argument("--sizes", default=";".join(SIZES), help="which release vectors (names of SIZES, ';' between)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = []
    for name in a.sizes.split(";"):
        for k in map(int, a.clients.split(",")):
            for drop in (False, True):
                rows.append({"release": name, **best(k, SIZES[name], drop, a.repeats)})
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        command = f"benchmarks/secagg_cost.py --clients {a.clients} --sizes '{a.sizes}' --repeats {a.repeats}"
        machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        meta = {"command": command, "date": str(date.today()), "dropouts": DROPOUTS, "machine": machine}
        Path(a.out).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
