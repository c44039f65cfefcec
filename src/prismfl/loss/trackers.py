"""Trackers of the feature-matching gaps (GFMN's "moving average" networks): instead of one batch's gap
between the real and the generated statistics, the generator follows a smoothed estimate of it. The
trackers persist per client across rounds (a checkpoint holds them: `state_dict`, checked by `schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prismfl import schema
from prismfl.describe import MISSING, describe

TRACKERS = ("none", "ema", "adam")


@dataclass
class TrackerState:
    """Trackers of the per-statistic gaps (GFMN's "moving averages"); persist per client across rounds.

    'ema': v <- beta v + (1 - beta) gap, started at the first gap. 'adam': GFMN's form, v fitted to
    the gap by Adam on 1/2 ||v - gap||^2 (the optimizer is built lazily and kept here).
    """

    vectors: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    # per-class trackers that move only when their class is drawn (loss.codes_per_step): which have started
    started: torch.Tensor | None = None

    def state_dict(self) -> dict:
        opt = self.optimizer.state_dict() if self.optimizer is not None else None
        state = {"vectors": [v.detach().clone() for v in self.vectors], "optimizer": opt}
        if self.started is not None:
            state["started"] = self.started.clone()
        return state

    @staticmethod
    def schema(kind: str | None = None, targets: list[tuple[int, ...]] | None = None, *, redraws: bool = False,
               legacy: bool = False, lr: float | None = None, betas=(0.5, 0.999)) -> schema.Node:  # fmt: skip
        """What state_dict writes for a loss whose tracker is `kind` ("none", "ema", "adam"; None: not known)
        and whose statistics have the shapes `targets` (MeanVarMatching.targets): no vectors (not started
        yet) or one per statistic of its shape; an Adam state over them for "adam" (at `lr`, `betas`);
        the drawn rows' `started` flags for a loss that draws classes at every step (`redraws`).
        `legacy`: vectors of another layout are allowed, without flags (ConditionalMatching starts them afresh)."""
        vectors = schema.List(schema.Tensor(torch.float32, None), what="a list of float32 tensors")
        table = schema.Table({"vectors": vectors, "optimizer": schema.Opt(schema.Table({}, what="an Adam state"))},
                             optional={"started": schema.Tensor(torch.bool, (None,))},
                             what="a tracker state (a table)")  # fmt: skip

        def fits(state: dict, path: str) -> None:
            vs, opt = state["vectors"], state["optimizer"]
            shapes = [tuple(v.shape) for v in vs]
            at = lambda key: schema.join(path, key)  # noqa: E731
            if kind == "none" and (vs or opt is not None or "started" in state):
                schema.fail(at("vectors"), "no trackers (loss.tracker = 'none')", vs)
            layout = targets is None or not vs or shapes == [tuple(t) for t in targets]
            if not layout and not (legacy and "started" not in state):
                want = f"[] or {len(targets)} tensors of the statistics' shapes ({', '.join(map(str, targets[:3]))}...)"
                schema.fail(at("vectors"), want, got=f"{len(vs)} tensors of shapes "
                            f"{', '.join(str(s) for s in shapes[:3])}{'...' if len(shapes) > 3 else ''}")  # fmt: skip
            if opt is not None:
                if kind not in (None, "adam") or not vs:
                    schema.fail(at("optimizer"), "null (an Adam state only for loss.tracker = 'adam', once started)",
                                got=describe(opt))  # fmt: skip
                rate = schema.Num(0, above=True) if lr is None else schema.Const(lr, what=f"{lr} (loss.tracker_lr)")
                schema.adam(shapes, rate, schema.Const(list(betas)))(opt, at("optimizer"))
            elif kind == "adam" and vs:
                schema.fail(at("optimizer"), "the trackers' Adam state (loss.tracker = 'adam')", opt)
            if "started" in state:
                if kind is not None and not redraws:
                    schema.fail(at("started"), "no flags (only for a loss that draws classes at every step)",
                                state["started"])  # fmt: skip
                rows = targets[0][0] if targets else None
                schema.Tensor(torch.bool, (rows,))(state["started"], at("started"))
                if not vs:
                    schema.fail(at("started"), "no flags before the trackers start", state["started"])
            elif redraws and vs and layout:
                schema.fail(at("started"), "the flags of the classes whose trackers have started", MISSING)

        return schema.Each(table, fits)

    @classmethod
    def from_state_dict(cls, state: dict, lr: float = 1e-5, betas=(0.5, 0.999), *, expect: schema.Node | None = None,
                        where: str = "tracker state", path: str = "") -> TrackerState:  # fmt: skip
        """The inverse of state_dict, after a check against `expect` (TrackerState.schema; by default,
        one that knows neither the loss nor its statistics; schema.ANY: the caller has checked it). A
        StateError naming the field otherwise."""
        if expect is not schema.ANY:
            schema.check(expect or TrackerState.schema(lr=None, betas=betas), state, where, path)
        started = state.get("started")
        tracker = cls([v.clone() for v in state["vectors"]], started=None if started is None else started.clone())
        if state["optimizer"] is not None:
            tracker.vectors = [v.requires_grad_(True) for v in tracker.vectors]
            tracker.optimizer = torch.optim.Adam(tracker.vectors, lr=lr, betas=betas)
            tracker.optimizer.load_state_dict(state["optimizer"])
        return tracker

    def follow(self, gaps: list[torch.Tensor], kind: str, beta: float, lr: float, betas) -> list[torch.Tensor]:
        """Move the trackers by a step's gaps; the directions the generator follows. "ema": v <- beta v +
        (1 - beta) gap, started at the first gap; "adam": one Adam step (at `lr`, `betas`) of v, from 0, on
        1/2 ||v - gap||^2."""
        if kind == "ema":
            if not self.vectors:
                self.vectors = [g.clone() for g in gaps]
            else:
                for v, g in zip(self.vectors, gaps):
                    v.mul_(beta).add_(g, alpha=1.0 - beta)
            return self.vectors
        if self.optimizer is None:
            self.vectors = [torch.zeros_like(g).requires_grad_(True) for g in gaps]
            self.optimizer = torch.optim.Adam(self.vectors, lr=lr, betas=betas)
        for v, g in zip(self.vectors, gaps):
            v.grad = v.detach() - g  # gradient of 1/2 ||v - gap||^2
        self.optimizer.step()
        return [v.detach() for v in self.vectors]

    def follow_rows(self, gaps: list[torch.Tensor], rows: torch.Tensor, beta: float,
                    targets: list[torch.Tensor]) -> list[torch.Tensor]:  # fmt: skip
        """The EMA trackers of the drawn classes' `rows` only (of statistics stacked as `targets`, a row per
        class); a class's first draw starts its tracker at the gap."""
        if not self.vectors:
            self.vectors = [torch.zeros_like(t) for t in targets]
            self.started = torch.zeros(len(targets[0]), dtype=torch.bool, device=targets[0].device)
        started, directions = self.started[rows][:, None], []
        for v, g in zip(self.vectors, gaps):
            moved = torch.where(started, beta * v[rows] + (1.0 - beta) * g, g)
            v[rows] = moved
            directions.append(moved)
        self.started[rows] = True
        return directions
