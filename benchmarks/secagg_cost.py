"""The cost of secure aggregation (privacy.secagg): bytes and time per client and at the server, for
K clients and vectors of the sizes the demo's private configurations release (docs/privacy.md).

Each client: one X25519 key pair, K - 1 key agreements, K - 1 mask expansions (HKDF + AES-256-CTR)
over its vector; the server: the sum of K vectors modulo 2^64 and the decoding. Messages: one
public key up (32 bytes) at set-up, the K public keys down, one masked vector up (8 bytes a word).

Run:  .venv/bin/python benchmarks/secagg_cost.py --out docs/benchmarks/privacy/secagg-cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from prismfl import secagg

# words of the release vector (sums, squares, counts) of the demo's conditional configurations: per class,
# 6,267 pooled features (49 + 2 x 1,568 + 2 x 1,024 + 2 x 512 + 10) and 1,325 more with 50 principal
# components (what the retired loss.pca = 50 added; the squares are sent as zeros with loss.moment = "mean")
SIZES = {"pool 4 (10 classes)": 10 * 2 * 6_267 + 10, "pool 4, pca 50 (10 classes)": 10 * 2 * 7_592 + 10}


def measure(k: int, words: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    layout = [[words - 2], [1], [1]]
    clients = {i: secagg.SecAggClient(secagg.encode(torch.randn(words, generator=gen, dtype=torch.float64)), layout)
               for i in range(k)}  # fmt: skip
    keys = {i: c.public()["public_key"] for i, c in clients.items()}
    context = secagg.context_of(0, keys)
    client_s, server_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        masked = {i: c.masked(i, keys, context).tobytes() for i, c in clients.items()}
        client_s.append((time.perf_counter() - t0) / k)
        t0 = time.perf_counter()
        secagg.aggregate(masked, layout)
        server_s.append(time.perf_counter() - t0)
    return {"clients": k, "words": words, "masked_bytes_per_client": 8 * words, "key_bytes_up": 32,
            "key_bytes_down_per_client": 32 * k, "client_seconds": round(min(client_s), 4),
            "server_seconds": round(min(server_s), 4)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="10,100")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = []
    for name, words in SIZES.items():
        for k in map(int, a.clients.split(",")):
            rows.append({"release": name, **measure(k, words, a.repeats)})
            print(json.dumps(rows[-1]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": f"benchmarks/secagg_cost.py --clients {a.clients}", "date": str(date.today()),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}  # fmt: skip
        Path(a.out).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
