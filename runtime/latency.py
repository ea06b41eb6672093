"""Latency model of one co-serving iteration, fitted from measurements.

The hybrid token scheduler asks "how many finetuning tokens can ride in this
iteration without breaking the TPOT target?". It answers with a linear model
of iteration time in the work the batch contains:

    t = c0 + c_decode * decode_tokens + c_prefill * prefill_tokens
           + c_attn * attention_pairs + c_ft_fwd * ft_forward_tokens
           + c_ft_bwd * ft_backward_layer_tokens / num_layers + c_bwd_layer * ft_backward_layers / num_layers
           + c_loss * ft_loss_tokens + c_seg * lora_segments + c_fwd * forward_pass + c_multi * multi_token

One iteration is ONE pass over the weights for every token (the serving graphs
run inference and finetuning rows together), so a finetuning forward token
costs its marginal compute only: there is no fixed cost per finetuning pass.
``attention_pairs`` (sum over prefill/finetuning chunks of new tokens times
context length) carries the quadratic part of attention; the backward windows
run apart, per layer, so a backward layer call has a fixed cost of its own
besides its per-token work. A sequence's first backward window also runs the
LM head's loss, forward and backward over the whole sequence
(``ft_loss_tokens``: on SmolLM2 about as much as eight layers' backward). The
LoRA branch runs once per adapter segment of the flat batch in every adapted
projection (``lora_segments``): many small ops, a fixed cost per adapter in the
batch that dominates on a CPU. ``forward_pass`` is 1 when the iteration runs the
serving graphs at all (any forward token): their fixed cost (every layer's ops,
the embedding, the logits), which an iteration of backward windows alone does
not pay; ``multi_token`` is 1 when that pass has more than one token: a
one-token batch runs every projection as a matrix-vector product, which costs
less than the smallest matrix product (SmolLM2 fp32 on a 2-core CPU: 48 ms for
one decode, 64 ms for two, 68 ms for four). Coefficients are fitted by non-negative least
squares from a start-up profile, persisted as JSON, and refined online from
every measured iteration (a bounded window of recent samples, refitted every
few iterations).

Drift: the model compares every observed iteration with its prediction. When
the median observed/predicted ratio over the last ``drift_window`` iterations
is off by more than ``drift_threshold`` (25%), it adapts at once: every
coefficient is scaled by that ratio and the samples from before the change are
dropped, so later refits see the new speed only; half a window later it checks
again (and rescales again if still off). Separately, :attr:`LatencyModel.drift`
says whether iterations currently take a different time than the *profile*
predicted (a busy or slower machine), with the ratio; a warning is logged once
per such episode. A ``check`` (see :mod:`flexc.runtime.latency_checks`) keeps
online refits plausible: a coefficient it rejects keeps its current value and
the others are fitted around it.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from flexc.runtime.batch import SchedulerOutput, ScheduledSequence, SeqKind

if TYPE_CHECKING:
    from flexc.runtime.sequence import SequenceProgress

logger = logging.getLogger(__name__)

__all__ = ["IterationWork", "LatencyModel", "Drift", "FEATURES", "iteration_work", "forward_work"]

FEATURES = ("const", "decode_tokens", "prefill_tokens", "attention_pairs", "ft_forward_tokens",
            "ft_backward_layer_tokens", "ft_backward_layers", "ft_loss_tokens", "lora_segments", "forward_pass",
            "multi_token")


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
    ft_loss_tokens: int = 0
    """Tokens of the finetuning sequences whose loss head (forward and backward over the whole sequence) runs in
    this iteration: those whose first backward window it is."""
    lora_segments: int = 0
    """Adapter segments in the flat batch (its distinct adapters; rows without one form none)."""

    def features(self, num_layers: int) -> np.ndarray:
        n = max(num_layers, 1)
        return np.array([1.0, self.decode_tokens, self.prefill_tokens, self.attention_pairs,
                         self.ft_forward_tokens, self.ft_backward_layer_tokens / n, self.ft_backward_layers / n,
                         self.ft_loss_tokens, self.lora_segments, float(self.forward_tokens > 0),
                         float(self.forward_tokens > 1)])

    @property
    def forward_tokens(self) -> int:
        """Tokens of the flat batch the serving graphs run (inference and finetuning)."""
        return self.decode_tokens + self.prefill_tokens + self.ft_forward_tokens

    def __add__(self, other: "IterationWork") -> "IterationWork":
        return IterationWork(**{f: getattr(self, f) + getattr(other, f) for f in _WORK_FIELDS})


_WORK_FIELDS = tuple(f.name for f in dataclasses.fields(IterationWork))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares, min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set: exact, a few
    small least-squares solves; no scipy needed)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(a.shape) * max(float(np.abs(a).max(initial=0.0)), 1.0)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max() <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        for _ in range(3 * n):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                x = z
                break
            neg = passive & (z <= tol)                # step back to the boundary, drop what reaches it
            alpha = float(np.min(x[neg] / (x[neg] - z[neg])))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class Drift:
    """Iterations take a different time than the start-up profile predicted (what a progress line shows)."""

    ratio: float
    """Median observed / profiled seconds over the recent window (2.0: iterations take twice the profiled time)."""
    window: int
    """Iterations the ratio is taken over."""
    since: int
    """Observation count at which this episode began."""


def _nnls_scaled(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NNLS with columns scaled to comparable magnitudes (what the solver's tolerance assumes)."""
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    return _nnls(a / scale, b) / scale


class LatencyModel:
    """Predicts iteration seconds from :class:`IterationWork`; fit, refine, save, load."""

    def __init__(self, num_layers: int, coef: Optional[Sequence[float]] = None, window: int = 512,
                 refit_every: int = 16, drift_threshold: float = 0.25, drift_window: int = 16,
                 check: Optional[Callable[[np.ndarray], list[int]]] = None):
        """``drift_threshold``: relative difference of observed and predicted seconds (median over the last
        ``drift_window`` iterations) beyond which the model adapts at once and reports :attr:`drift`;
        ``check``: given coefficients, the indices of implausible ones (online refits keep those unchanged)."""
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if not drift_threshold > 0:
            raise ValueError(f"drift_threshold must be a positive fraction, got {drift_threshold}")
        if drift_window < 2:
            raise ValueError(f"drift_window must be at least 2 iterations, got {drift_window}")
        self.num_layers = num_layers
        self.coef = np.array(coef if coef is not None else [0.0] * len(FEATURES), dtype=float)
        if self.coef.shape != (len(FEATURES),):
            raise ValueError(f"latency model needs {len(FEATURES)} coefficients ({', '.join(FEATURES)}), "
                             f"got {len(self.coef)}")
        self._samples: collections.deque = collections.deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self.check = check
        self.drift_threshold = drift_threshold
        self.drift_window = drift_window
        self.profiled: Optional[np.ndarray] = self.coef.copy() if coef is not None else None
        """The coefficients of the start-up profile (fitted or loaded); what :attr:`drift` compares with."""
        self.observations = 0
        """Iterations observed since construction."""
        self.adaptations = 0
        """Times the model rescaled itself after observed times drifted from its predictions."""
        self._ratios: collections.deque = collections.deque(maxlen=drift_window)        # observed / predicted
        self._profiled_ratios: collections.deque = collections.deque(maxlen=drift_window)   # observed / profiled
        self._drift: Optional[Drift] = None
        self._following = False
        self.saved_context: Optional[dict] = None
        """What a loaded profile says it was measured on (see :meth:`load`)."""
        self.log_drift = True
        """Whether a drift episode is logged (a simulated engine has no machine to be busy and turns it off;
        :attr:`drift` is kept either way)."""
        self.source: Optional[str] = None
        """Where the profile came from: ``loaded``, ``profiled``, ``corrected`` (see
        :func:`~flexc.runtime.profiling.load_or_profile`), None when set otherwise."""

    def predict(self, work: IterationWork) -> float:
        """Predicted seconds of an iteration doing ``work``."""
        return float(self.coef @ work.features(self.num_layers))

    def fit(self, samples: Iterable[tuple[IterationWork, float]]) -> "LatencyModel":
        """Fit the coefficients to (work, measured seconds) pairs; keeps them as the refinement window and the
        fit as the profile :attr:`drift` compares with."""
        for w, t in samples:
            self._samples.append((w.features(self.num_layers), float(t)))
        self._refit()
        self.set_profile(self.coef)
        return self

    def set_profile(self, coef: Sequence[float], samples: Iterable[tuple[Sequence[float], float]] = ()) -> None:
        """Use ``coef`` as the current and the profiled coefficients (a loaded or corrected profile), with the
        feature rows and seconds it was fitted from as the refinement window; forgets any drift."""
        self.coef = np.array(coef, dtype=float)
        self.profiled = self.coef.copy()
        rows = list(samples)
        if rows:
            self._samples.clear()
            self._samples.extend((np.asarray(f, dtype=float), float(t)) for f, t in rows)
        self._ratios.clear()
        self._profiled_ratios.clear()
        self._drift = None
        self._following = False

    @property
    def samples(self) -> list[tuple[np.ndarray, float]]:
        """The refinement window: (feature row, measured seconds), oldest first."""
        return list(self._samples)

    def residual(self) -> float:
        """Relative RMS error of the current coefficients over the window (RMS residual / mean seconds)."""
        if not self._samples:
            return 0.0
        a = np.stack([f for f, _ in self._samples])
        b = np.array([t for _, t in self._samples])
        return float(np.sqrt(np.mean((a @ self.coef - b) ** 2)) / max(float(b.mean()), 1e-12))

    @property
    def drift(self) -> Optional[Drift]:
        """Set while the recent iterations take more than ``drift_threshold`` more (or less) time than the
        profile predicted; None otherwise (and before a window of observations)."""
        return self._drift

    def observe(self, work: IterationWork, seconds: float) -> None:
        """Record one measured iteration: follow drift at once, else refit every ``refit_every`` observations."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        f = work.features(self.num_layers)
        pred = float(self.coef @ f)
        self._samples.append((f, float(seconds)))
        self.observations += 1
        if pred > 0 and seconds > 0:
            self._ratios.append(seconds / pred)
        if self.profiled is not None and seconds > 0 and (prof := float(self.profiled @ f)) > 0:
            self._profiled_ratios.append(seconds / prof)
            self._track_drift()
        self._since_fit += 1
        if not self._adapt() and self._since_fit >= self._refit_every:
            self._refit()

    def _outside(self, ratio: float, threshold: float) -> bool:
        return abs(math.log(ratio)) > math.log1p(threshold)

    def _adapt(self) -> bool:
        """When the recent observed/predicted median is off by more than the threshold, scale every coefficient
        by it and drop the samples from before the change. Returns whether it adapted."""
        # NOTE: right after an adaptation half a window decides whether it went far enough (a rescale fitted on
        # one mix of iterations may be off for the mix the policy schedules next)
        if len(self._ratios) < (self.drift_window // 2 if self._following else self.drift_window):
            return False
        r = float(np.median(self._ratios))
        if not self._outside(r, self.drift_threshold):
            self._following = self._following and len(self._ratios) < self.drift_window
            return False
        self._following = True
        self.coef = self.coef * r
        recent = list(self._samples)[-self.drift_window:]
        self._samples.clear()
        self._samples.extend(recent)
        self._ratios.clear()
        self._since_fit = 0
        self.adaptations += 1
        logger.info("latency model: iterations took %.2fx its predictions over the last %d; rescaled to follow",
                    r, self.drift_window)
        return True

    def _track_drift(self) -> None:
        """Enter a drift episode when observed/profiled leaves the threshold, leave it when back within half of it
        (hysteresis: one warning per episode)."""
        if len(self._profiled_ratios) < self.drift_window:
            return
        r = float(np.median(self._profiled_ratios))
        if self._drift is None and self._outside(r, self.drift_threshold):
            # NOTE: the profile's grid can also fit this load's iterations poorly (see runtime/profiling.py)
            log = logger.warning if self.log_drift else logger.debug
            log("iterations take %.2fx the profiled time (median of the last %d): the machine is %s than when the "
                "latency model was profiled, or the profile fits this load's iterations poorly; the model adapts",
                r, self.drift_window, "slower (busy?)" if r > 1 else "faster")
            self._drift = Drift(ratio=r, window=self.drift_window, since=self.observations)
        elif self._drift is not None:
            if self._outside(r, self.drift_threshold / 2):
                self._drift = dataclasses.replace(self._drift, ratio=r)
            else:
                logger.info("iterations are back within %.0f%% of the profiled time (%.2fx)",
                            100 * self.drift_threshold, r)
                self._drift = None

    def _refit(self) -> None:
        self._since_fit = 0
        if len(self._samples) < 2:
            return
        a = np.stack([f for f, _ in self._samples])
        b = np.array([t for _, t in self._samples])
        # NOTE: a feature no sample in the window has (no backward ran lately) keeps its coefficient: fitted as
        # 0 it would make that work look free, and a policy would schedule all of it at once. So does one that is
        # the same in every sample (forward_pass when every iteration ran the serving graphs): the fit cannot tell
        # it from the constant, and a split it made up would misprice the kinds of iteration the window lacks
        free = (np.abs(a).max(axis=0) > 0) & ((a.max(axis=0) > a.min(axis=0)) | (np.arange(a.shape[1]) == 0))
        coef = self.coef.copy()
        for _ in range(len(FEATURES)):
            coef[free] = _nnls_scaled(a[:, free], b - a[:, ~free] @ coef[~free])
            bad = [i for i in (self.check(coef) if self.check is not None and self.profiled is not None else [])
                   if free[i]]
            if not bad or not free.any():
                break
            # NOTE: a coefficient the check rejects (e.g. 0 for a per-token cost: two features always together)
            # keeps its current value; the rest are fitted around it
            coef[bad] = self.coef[bad]
            free[bad] = False
        self.coef = coef

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

    def to_dict(self, with_samples: bool = False) -> dict:
        d = {"features": list(FEATURES), "coef": [float(c) for c in self.coef], "num_layers": self.num_layers,
             "samples": len(self._samples), "residual": round(self.residual(), 4)}
        if with_samples:
            d["rows"] = [[float(x) for x in f] + [t] for f, t in self._samples]
        return d

    def save(self, path: str, context: Optional[dict] = None) -> None:
        """Write the coefficients, the samples they were fitted from and ``context`` (where they were measured,
        see :class:`~flexc.runtime.latency_checks.ProfileContext`) as JSON, atomically."""
        d = self.to_dict(with_samples=True)
        if context is not None:
            d["context"] = context
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "LatencyModel":
        """Read a model saved by :meth:`save` (its samples become the window; ``saved_context`` holds the saved
        context dict, None if the file has none); a file of another shape is a ValueError naming it."""
        try:
            with open(path) as f:
                d = json.load(f)
            if list(d["features"]) != list(FEATURES):
                raise ValueError(f"features {d['features']} differ from {list(FEATURES)}")
            m = cls(int(d["num_layers"]), d["coef"])
            rows = [(r[:-1], r[-1]) for r in d.get("rows", [])]
            if any(len(f) != len(FEATURES) for f, _ in rows):
                raise ValueError(f"sample rows need {len(FEATURES) + 1} numbers")
            m.set_profile(m.coef, rows)
            m.saved_context = d.get("context")
            return m
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a flexc latency model ({e})") from e


def iteration_work(batch: SchedulerOutput, num_layers: int,
                   sequences: Mapping[str, "SequenceProgress"]) -> IterationWork:
    """The latency model's description of a scheduled batch, taken before it runs (``sequences``: the finetuning
    sequences by id; a backward window of a sequence whose loss head has not run yet runs it)."""
    bwd = loss = 0
    for sid, k in batch.finetune_backward.items():
        fs = sequences.get(sid)
        if fs is not None and k > 0:
            bwd += k * fs.length
            loss += 0 if fs.head_done else fs.length
    return forward_work(batch.seqs) + IterationWork(ft_backward_layer_tokens=bwd, ft_loss_tokens=loss,
                                                  ft_backward_layers=sum(batch.finetune_backward.values()))


def forward_work(seqs: list[ScheduledSequence]) -> IterationWork:
    """The forward part: tokens by kind, the attention pairs of every chunk and the adapter segments."""
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
    return IterationWork(decode_tokens=dec, prefill_tokens=pre, attention_pairs=pairs, ft_forward_tokens=ft,
                         lora_segments=len({s.adapter_id for s in seqs if s.adapter_id is not None}))
