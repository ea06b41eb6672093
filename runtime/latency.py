"""Latency model of one co-serving iteration, fitted from measurements.

The hybrid token scheduler asks "how many finetuning tokens can ride in this
iteration without breaking the TPOT target?". It answers with a linear model
of iteration time in the work the batch contains:

    t = c0 + c_decode * decode_tokens + c_prefill * prefill_tokens
           + c_attn * attention_pairs + c_ft_fwd * ft_forward_tokens
           + c_ft_bwd * ft_backward_layer_tokens / num_layers + c_bwd_layer * ft_backward_layers / num_layers

One iteration is ONE pass over the weights for every token (the serving graphs
run inference and finetuning rows together), so a finetuning forward token
costs its marginal compute only: there is no fixed cost per finetuning pass.
``attention_pairs`` (sum over prefill/finetuning chunks of new tokens times
context length) carries the quadratic part of attention; the backward windows
run apart, per layer, so a backward layer call has a fixed cost of its own
besides its per-token work. Coefficients are fitted by non-negative least
squares from a start-up profile, persisted as JSON, and refined online from
every measured iteration (a bounded window of recent samples, refitted every
few iterations).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from flexc.runtime.batch import SchedulerOutput, ScheduledSequence, SeqKind

__all__ = ["IterationWork", "LatencyModel", "FEATURES", "iteration_work", "forward_work"]

FEATURES = ("const", "decode_tokens", "prefill_tokens", "attention_pairs", "ft_forward_tokens",
            "ft_backward_layer_tokens", "ft_backward_layers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterationWork:
    """What one iteration computes (the latency model's input)."""

    decode_tokens: int = 0
    """Inference tokens in decode (one per running request)."""
    prefill_tokens: int = 0
    """Inference prompt tokens in this iteration's prefill chunks."""
    attention_pairs: int = 0
    """Sum over chunks of new tokens x total context: the quadratic attention work."""
    ft_forward_tokens: int = 0
    """Finetuning tokens whose forward runs in this iteration."""
    ft_backward_layer_tokens: int = 0
    """Finetuning backward work: sequence tokens x layers whose backward runs in this iteration."""
    ft_backward_layers: int = 0
    """Layer backward calls (summed over the finetuning sequences' windows)."""

    def features(self, num_layers: int) -> np.ndarray:
        n = max(num_layers, 1)
        return np.array([1.0, self.decode_tokens, self.prefill_tokens, self.attention_pairs,
                         self.ft_forward_tokens, self.ft_backward_layer_tokens / n, self.ft_backward_layers / n])

    def __add__(self, other: "IterationWork") -> "IterationWork":
        return IterationWork(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                                for f in dataclasses.fields(self)})


def _nnls(a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Non-negative least squares by projected coordinate descent (small problems, no scipy needed)."""
    ata = a.T @ a
    atb = a.T @ b
    x = np.maximum(np.linalg.lstsq(a, b, rcond=None)[0], 0.0)
    for _ in range(iters):
        prev = x.copy()
        for j in range(len(x)):
            if ata[j, j] <= 0:
                x[j] = 0.0
                continue
            r = atb[j] - ata[j] @ x + ata[j, j] * x[j]
            x[j] = max(r / ata[j, j], 0.0)
        if np.max(np.abs(x - prev)) <= 1e-12 * (1 + np.max(np.abs(x))):
            break
    return x


class LatencyModel:
    """Predicts iteration seconds from :class:`IterationWork`; fit, refine, save, load."""

    def __init__(self, num_layers: int, coef: Optional[Sequence[float]] = None, window: int = 512,
                 refit_every: int = 16):
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.coef = np.array(coef if coef is not None else [0.0] * len(FEATURES), dtype=float)
        if self.coef.shape != (len(FEATURES),):
            raise ValueError(f"latency model needs {len(FEATURES)} coefficients ({', '.join(FEATURES)}), "
                             f"got {len(self.coef)}")
        self._samples: collections.deque = collections.deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0

    def predict(self, work: IterationWork) -> float:
        """Predicted seconds of an iteration doing ``work``."""
        return float(self.coef @ work.features(self.num_layers))

    def fit(self, samples: Iterable[tuple[IterationWork, float]]) -> "LatencyModel":
        """Fit the coefficients to (work, measured seconds) pairs; keeps them as the refinement window."""
        for w, t in samples:
            self._samples.append((w.features(self.num_layers), float(t)))
        self._refit()
        return self

    def observe(self, work: IterationWork, seconds: float) -> None:
        """Record one measured iteration; refit every ``refit_every`` observations."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        self._samples.append((work.features(self.num_layers), float(seconds)))
        self._since_fit += 1
        if self._since_fit >= self._refit_every:
            self._refit()

    def _refit(self) -> None:
        self._since_fit = 0
        if len(self._samples) < 2:
            return
        a = np.stack([f for f, _ in self._samples])
        b = np.array([t for _, t in self._samples])
        # scale columns so the solver sees comparable magnitudes
        scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
        self.coef = _nnls(a / scale, b) / scale

    def max_units(self, base: IterationWork, budget_s: float, unit: IterationWork, limit: int) -> int:
        """Largest n <= limit such that ``base + n * unit`` is predicted within ``budget_s`` (0 if none fits)."""
        return self.max_fit(base, budget_s, lambda n: IterationWork(
            **{f.name: n * getattr(unit, f.name) for f in dataclasses.fields(unit)}), limit)

    def max_fit(self, base: IterationWork, budget_s: float, extra: Callable[[int], IterationWork],
                limit: int) -> int:
        """Largest n <= limit such that ``base + extra(n)`` is predicted within ``budget_s`` (0 if none fits);
        ``extra`` must not shrink as n grows (e.g. a chunk's tokens with their attention pairs, quadratic in n).
        A binary search over n."""
        if limit <= 0 or self.predict(base + extra(1)) > budget_s:
            return 0
        lo, hi = 1, limit                      # invariant: lo fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(base + extra(mid)) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coef": [float(c) for c in self.coef], "num_layers": self.num_layers,
                "samples": len(self._samples)}

    def save(self, path: str) -> None:
        """Write the coefficients as JSON (atomically)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "LatencyModel":
        """Read a model saved by :meth:`save`; a file of another shape is a ValueError naming it."""
        try:
            with open(path) as f:
                d = json.load(f)
            if list(d["features"]) != list(FEATURES):
                raise ValueError(f"features {d['features']} differ from {list(FEATURES)}")
            return cls(int(d["num_layers"]), d["coef"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a flexc latency model ({e})") from e


def iteration_work(batch: SchedulerOutput, num_layers: int, lengths: dict[str, int]) -> IterationWork:
    """The latency model's description of a scheduled batch (``lengths``: finetuning sequence lengths)."""
    bwd = sum(k * lengths.get(sid, 0) for sid, k in batch.finetune_backward.items())
    return forward_work(batch.seqs) + IterationWork(ft_backward_layer_tokens=bwd,
                                                  ft_backward_layers=sum(batch.finetune_backward.values()))


def forward_work(seqs: list[ScheduledSequence]) -> IterationWork:
    """The forward part: tokens by kind and the attention pairs of every chunk."""
    dec = pre = ft = pairs = 0
    for s in seqs:
        n = len(s.token_ids)
        if s.kind is SeqKind.FINETUNE:
            ft += n
        elif s.kind is SeqKind.DECODE:
            dec += n
        else:
            pre += n
        pairs += n * (s.num_computed_tokens + n) if n > 1 else 0
    return IterationWork(decode_tokens=dec, prefill_tokens=pre, attention_pairs=pairs, ft_forward_tokens=ft)
