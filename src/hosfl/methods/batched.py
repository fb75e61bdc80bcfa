"""Batched simulation of HO-SFL's clients in one process (``simulate=batched``): the K
clients of a step hold one θ_c, so their forwards are one forward of the concatenated
batches and probe p one forward at θ_c + μu_p. A real device's client keeps its sequential
probes and its inference-level memory; this is for simulation only."""

from __future__ import annotations

import torch

from hosfl import devices, directions, zo
from hosfl.methods.base import ClientRole
from hosfl.methods.shard import concatenated, forward_group
from hosfl.protocol import CutGradient, Message, SmashedData, StepPlan


class BatchedProbes(ClientRole):
    """``handle_group`` for a client role with ``_pending``, ``_forward``, ``_probe``,
    ``_value``, ``_size`` and ``_reply`` (HO-SFL's ``Client``)."""

    @classmethod
    @torch.no_grad()
    def handle_group(cls, roles: list[BatchedProbes], msgs: list[Message]) -> list[Message | None]:
        """The K clients of a step, which hold one θ_c, as one batch: their forwards are one
        forward of the concatenated batches, and probe p is one forward at θ_c + μu_p from
        which each client's v_mp = λ_mᵀ(f(x_m; θ + μu_p) − z_m) is read off its own rows.
        Each reply is the message that client sends alone (z_m, y_m; its P scalars), equal
        to float rounding: a batch of another size may take other kernel paths."""
        first = msgs[0]
        same = all(type(m) is type(first) and m.step == first.step for m in msgs)
        if not same or not isinstance(first, StepPlan | CutGradient):
            return super().handle_group(roles, msgs)
        if isinstance(first, StepPlan):
            return cls._forward_group(roles, msgs)
        return cls._probe_group(roles, msgs)

    @classmethod
    def _forward_group(cls, roles: list, msgs: list[StepPlan]) -> list[Message | None]:
        step = msgs[0].step
        lead = roles[0]
        if lead.replica.step != step:
            return [lead.handle(msgs[0])]  # its error, as alone
        rows = forward_group(roles, step, lead._forward)
        if rows is None:
            return super().handle_group(roles, msgs)
        replies = []
        for role, msg, (xm, ym, zm) in zip(roles, msgs, rows, strict=True):
            role._pending = (step, xm, zm, msg.seeds.tolist())
            replies.append(SmashedData(step, zm, ym))
        return replies

    @classmethod
    def _probe_group(cls, roles: list, msgs: list[CutGradient]) -> list[Message | None]:
        step = msgs[0].step
        pending = [r._pending for r in roles]
        if any(p is None or p[0] != step for p in pending) or any(
            p[3] != pending[0][3] for p in pending
        ):
            return super().handle_group(roles, msgs)  # each raises, or answers, as alone
        joined = concatenated([p[1] for p in pending])
        if joined is None:
            return super().handle_group(roles, msgs)
        x, sizes = joined
        seeds = pending[0][3]
        for role in roles:
            role._pending = None
        lead = roles[0]
        directions.prefill(seeds, lead.replica.params, lead.replica.directions.at(step))
        # each λ_m in float64 once for its P + 1 projections (the values are those alone)
        lams = [devices.to(m.lam, p[2].device).double() for m, p in zip(msgs, pending, strict=True)]
        bases = [zo.project(lam, p[2]) for lam, p in zip(lams, pending, strict=True)]
        # f(θ) is not needed beyond λᵀ f(θ) and, as alone, a few rows to size the probes with
        kept = [lead._sizing(p[2]) for p in pending] if lead.sized else []
        del pending
        # the P probes first, then each client's P projections while its λ is in the cache
        probes = [lead._probe(x, seed, step).split(sizes) for seed in seeds]
        replies = []
        for m, (lam, base) in enumerate(zip(lams, bases, strict=True)):
            values = [lead._value(lam, zp[m], base) for zp in probes]
            moved = [lead._size(zp[m], *kept[m]) for zp in probes] if kept else []
            replies.append(lead._reply(step, values, moved))
        return replies
