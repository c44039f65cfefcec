"""Codec throughput and size: range-coded uploads and broadcast deltas against packed bits, and the
full state (scores, and the server's velocity) range-coded against float32.

Run: .venv/bin/python benchmarks/codec.py [--run runs/demo ...] [--out docs/benchmarks/codec.json]
With --run, the probabilities are the run's final global scores and the masks are drawn from a
perturbed copy of them (a client that moved away from the global model); without, synthetic
scores N(0, 3^2). Sizes are the encoded messages themselves; times are the best of 3.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from prismfl.fl import aggregate, wire


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(scores: torch.Tensor, client_shift: float, m: int = 5) -> dict:
    n = scores.numel()
    gen = torch.Generator().manual_seed(0)
    client = scores + client_shift * torch.randn(n, generator=gen)
    masks = [aggregate.sample_mask(client, torch.Generator().manual_seed(i)) for i in range(m)]
    enc_s, msg = best_of(lambda: wire.encode_upload(masks[0], scores, round_=1, table_hash=0, client=0, coder="range"))
    dec_s, back = best_of(lambda: wire.decode_upload(msg, scores, round_=1, table_hash=0, client=0))
    assert torch.equal(back, masks[0])
    bound = aggregate.cross_entropy_bits(masks[0], scores)
    counts = aggregate.count_masks(masks)
    denc_s, delta = best_of(lambda: wire.encode_delta(counts, m, 0.1, 0.01, scores, round_=1, table_hash=0))
    ddec_s, _ = best_of(lambda: wire.decode_delta(delta, scores, round_=1, table_hash=0))
    return {
        "weights": n,
        "upload_bytes_range": len(msg),
        "upload_bytes_packed": wire.HEADER.size + (n + 7) // 8,
        "upload_bits_per_weight": 8 * (len(msg) - wire.HEADER.size) / n,
        "entropy_bound_bits_per_weight": bound / n,
        "ratio_to_bound": 8 * (len(msg) - wire.HEADER.size) / bound,
        "upload_encode_s": enc_s,
        "upload_decode_s": dec_s,
        "upload_Mweights_per_s": n / (enc_s + dec_s) / 1e6,
        "delta_bytes": len(delta),
        "delta_bits_per_weight": 8 * len(delta) / n,
        "float32_state_bytes": wire.HEADER.size + 4 * n,
        "delta_encode_s": denc_s,
        "delta_decode_s": ddec_s,
    }


def measure_state(values: torch.Tensor) -> dict:
    """A full state as a client first receives it: raw float32 against the range-coded byte planes."""
    n = values.numel()
    enc_s, msg = best_of(lambda: wire.encode_state(values, round_=1, table_hash=0, coder="auto"))
    dec_s, (_, back) = best_of(lambda: wire.decode_state(msg, num_weights=n, table_hash=0))
    assert torch.equal(back.view(torch.int32), values.float().view(torch.int32))
    raw = wire.HEADER.size + 4 * n
    return {"weights": n, "float32_bytes": raw, "coded_bytes": len(msg), "coder": wire.CODERS[msg[6]],
            "ratio": len(msg) / raw, "encode_s": enc_s, "decode_s": dec_s}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", nargs="*", default=[])
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows, states = {}, {}
    for run in a.run:
        from prismfl import rundir

        server = rundir.load_checkpoint(Path(run))["server"]
        rows[f"{run} final global scores, client shift 1.0"] = measure(server["scores"], 1.0)
        for key in ("scores", "velocity"):
            if key in server:
                states[f"{run} final {key}"] = measure_state(server[key])
    for n in (1_359_872, 3_543_616):
        scores = 3.0 * torch.randn(n, generator=torch.Generator().manual_seed(1))
        rows[f"synthetic N(0, 9) scores, {n:,} weights, client shift 1.0"] = measure(scores, 1.0)
    states["zeros (a velocity before round 1), 1,359,872 weights"] = measure_state(torch.zeros(1_359_872))
    states["synthetic N(0, 9), 1,359,872 weights"] = measure_state(3.0 * torch.randn(
        1_359_872, generator=torch.Generator().manual_seed(1)))  # fmt: skip
    for name, r in rows.items():
        print(f"{name}\n  upload {r['upload_bits_per_weight']:.3f} bits/weight (bound "
              f"{r['entropy_bound_bits_per_weight']:.3f}, ratio {r['ratio_to_bound']:.4f}); encode "
              f"{r['upload_encode_s'] * 1e3:.0f} ms + decode {r['upload_decode_s'] * 1e3:.0f} ms; delta "
              f"{r['delta_bits_per_weight']:.3f} bits/weight, {r['delta_encode_s'] * 1e3:.0f} + "
              f"{r['delta_decode_s'] * 1e3:.0f} ms")  # fmt: skip
    for name, r in states.items():
        print(
            f"{name}\n  full state {r['float32_bytes']:,} -> {r['coded_bytes']:,} bytes ({r['coder']}, "
            f"x{r['ratio']:.3f}); encode {r['encode_s'] * 1e3:.0f} ms + decode {r['decode_s'] * 1e3:.0f} ms"
        )
    if a.out:
        meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, torch {torch.__version__}",
                "command": "benchmarks/codec.py" + "".join(f" --run {r}" for r in a.run)}  # fmt: skip
        Path(a.out).write_text(json.dumps({**meta, "rows": rows, "states": states}, indent=1))


if __name__ == "__main__":
    main()
