"""Seeded workloads: when requests arrive, how long they are, what the finetuning job trains on.

Arrivals and lengths are separate objects (as Vidur's request generators):

* arrivals: :class:`PoissonArrivals` (exponential gaps), :class:`GammaArrivals` (gaps with a coefficient of
  variation: CV 1 is Poisson, CV > 1 is bursty, BurstGPT-like), :class:`TraceArrivals` (a trace's timestamps,
  optionally rescaled to a rate);
* lengths: :class:`LogNormalLengths` (prompt and output tokens, each a :class:`LogNormal` given by median and
  sigma or median and mean; ``CONVERSATION`` and ``SHAREGPT`` below) and :class:`TraceLengths`;
* finetuning: :func:`finetune_sequences`, lengths log-normal and capped (long reasoning data).

A trace is a CSV with a header, in the Azure LLM inference trace layout ``TIMESTAMP,ContextTokens,
GeneratedTokens`` (timestamps as seconds or ``2023-11-16 18:15:46.6805900``).

Example::

    wl = Workload(arrivals=GammaArrivals(rate=2.0, cv=2.0), lengths=SHAREGPT)
    reqs = wl.requests(duration=600, seed=0)     # [RequestSpec(arrival, prompt_tokens, output_tokens), ...]
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import types
from typing import Mapping, Optional, Protocol, Sequence

import numpy as np

__all__ = ["RequestSpec", "SequenceShape", "PoissonArrivals", "GammaArrivals", "TraceArrivals", "LogNormalLengths",
           "TraceLengths", "LogNormal", "Workload", "read_trace", "finetune_sequences", "fixed_lengths",
           "CONVERSATION", "SHAREGPT", "REASONING", "LENGTH_PRESETS"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """One simulated inference request."""

    arrival: float
    """Seconds from the start of the run."""
    prompt_tokens: int
    output_tokens: int
    """Tokens generated (the request ignores EOS and stops here)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceShape:
    """One simulated finetuning sequence: what a ``FinetuneJob`` needs of a dataset item, without the tokens."""

    length: int
    num_loss_tokens: int
    """Tokens whose loss counts (the job's loss scale)."""


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"arrival rate must be a positive number of requests per second, got {rate!r}")


class Arrivals(Protocol):
    def times(self, duration: float, rng: np.random.Generator) -> np.ndarray:
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoissonArrivals:
    """Exponential inter-arrival gaps at ``rate`` requests/s."""

    rate: float

    def __post_init__(self) -> None:
        _check_rate(self.rate)

    def times(self, duration: float, rng: np.random.Generator) -> np.ndarray:
        return _cumulative(lambda n: rng.exponential(1.0 / self.rate, n), self.rate, duration)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GammaArrivals:
    """Gamma inter-arrival gaps with mean 1/rate and coefficient of variation ``cv`` (shape 1/cv^2)."""

    rate: float
    cv: float = 2.0
    """Standard deviation / mean of the gaps: 1 is Poisson; BurstGPT-like traffic is burstier (> 1)."""

    def __post_init__(self) -> None:
        _check_rate(self.rate)
        if not (isinstance(self.cv, (int, float)) and math.isfinite(self.cv) and self.cv > 0):
            raise ValueError(f"cv must be a positive number, got {self.cv!r}")

    def times(self, duration: float, rng: np.random.Generator) -> np.ndarray:
        shape = 1.0 / self.cv ** 2
        return _cumulative(lambda n: rng.gamma(shape, 1.0 / (self.rate * shape), n), self.rate, duration)


def _cumulative(draw, rate: float, duration: float) -> np.ndarray:
    """Arrival times in [0, duration) from gaps drawn in blocks."""
    out: list[np.ndarray] = []
    t = 0.0
    block = max(int(rate * duration * 1.2) + 16, 16)
    while t < duration:
        gaps = draw(block)
        times = t + np.cumsum(gaps)
        out.append(times)
        t = float(times[-1])
    times = np.concatenate(out) if out else np.zeros(0)
    return times[times < duration]


@dataclasses.dataclass(frozen=True)
class TraceRow:
    arrival: float
    prompt_tokens: int
    output_tokens: int


def _timestamp(text: str, path: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    head, _, frac = text.strip().partition(".")
    try:
        t = datetime.datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise ValueError(f"{path}:{line}: TIMESTAMP {text!r} is neither seconds nor 'YYYY-MM-DD HH:MM:SS[.f]'") \
            from None
    return t.timestamp() + (float("0." + frac) if frac.isdigit() else 0.0)


def read_trace(path: str) -> list[TraceRow]:
    """Rows of a ``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV, arrivals relative to the first, in time order."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
                raise ValueError(f"{path}: expected the columns {','.join(need)}, got {reader.fieldnames}")
            rows = []
            for i, r in enumerate(reader, start=2):
                try:
                    p, o = int(r["ContextTokens"]), int(r["GeneratedTokens"])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{i}: ContextTokens and GeneratedTokens must be integers") from None
                if p < 1 or o < 1:
                    continue                  # failed requests (no prompt or no output) are not served load
                rows.append(TraceRow(_timestamp(r["TIMESTAMP"], path, i), p, o))
    except OSError as e:
        raise ValueError(f"cannot read trace {path}: {e.strerror or e}") from e
    if not rows:
        raise ValueError(f"{path}: the trace has no request with prompt and output tokens")
    rows.sort(key=lambda r: r.arrival)
    t0 = rows[0].arrival
    return [TraceRow(r.arrival - t0, r.prompt_tokens, r.output_tokens) for r in rows]


@dataclasses.dataclass(frozen=True)
class TraceArrivals:
    """A trace's arrival times; with ``rate``, rescaled so that the trace's mean rate becomes ``rate``."""

    rows: tuple[TraceRow, ...]
    rate: Optional[float] = None

    def __post_init__(self) -> None:
        if self.rate is not None:
            _check_rate(self.rate)

    @property
    def native_rate(self) -> float:
        span = self.rows[-1].arrival if len(self.rows) > 1 else 1.0
        return len(self.rows) / max(span, 1e-9)

    def times(self, duration: float, rng: np.random.Generator) -> np.ndarray:
        scale = self.native_rate / self.rate if self.rate is not None else 1.0
        t = np.array([r.arrival for r in self.rows]) * scale
        return t[t < duration]


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """A log-normal length: ``median`` tokens, ``sigma`` the standard deviation of its log."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        for f in ("median", "sigma"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"log-normal {f} must be a positive number, got {v!r}")

    @classmethod
    def from_mean(cls, median: float, mean: float) -> "LogNormal":
        """The log-normal with this median and mean (mean = median * exp(sigma^2 / 2))."""
        if not mean > median > 0:
            raise ValueError(f"a log-normal needs mean > median > 0, got median {median}, mean {mean}")
        return cls(median, math.sqrt(2 * math.log(mean / median)))

    def sample(self, n: int, rng: np.random.Generator, low: int, high: int) -> np.ndarray:
        """``n`` integer lengths in [low, high]."""
        x = np.exp(rng.normal(math.log(self.median), self.sigma, n))
        return np.clip(np.rint(x), low, high).astype(int)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogNormalLengths:
    """Prompt and output tokens, each log-normal, drawn independently; prompt + output at most ``max_total``."""

    prompt: LogNormal
    output: LogNormal
    max_total: int = 8192

    def __post_init__(self) -> None:
        if not isinstance(self.max_total, int) or self.max_total < 2:
            raise ValueError(f"max_total must be an integer >= 2, got {self.max_total!r}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = self.prompt.sample(n, rng, 1, self.max_total - 1)
        o = self.output.sample(n, rng, 1, self.max_total)
        return p, np.minimum(o, self.max_total - p)


@dataclasses.dataclass(frozen=True)
class TraceLengths:
    """The trace's own prompt and output lengths, in arrival order (cycled if more are asked for)."""

    rows: tuple[TraceRow, ...]
    max_total: int = 8192

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(n) % len(self.rows)
        p = np.clip(np.array([self.rows[i].prompt_tokens for i in idx]), 1, self.max_total - 1)
        o = np.array([self.rows[i].output_tokens for i in idx])
        return p, np.maximum(np.minimum(o, self.max_total - p), 1)


CONVERSATION = LogNormalLengths(prompt=LogNormal(1020, 0.99), output=LogNormal(129, 0.86))
"""Conversation traffic shaped like the Azure 2023 conv trace: prompt median 1,020 tokens, output median 129
(with the sigmas of the trace's log-normal fit)."""
SHAREGPT = LogNormalLengths(prompt=LogNormal.from_mean(40, 262), output=LogNormal.from_mean(239, 269))
"""ShareGPT-like: short prompts (median 40, mean 262 tokens), responses of median 239, mean 269."""
LENGTH_PRESETS: Mapping[str, LogNormalLengths] = types.MappingProxyType(
    {"conversation": CONVERSATION, "sharegpt": SHAREGPT})

REASONING = LogNormal(3000, 0.6)
"""Finetuning sequences shaped like long reasoning data: median 3,000 tokens, sigma 0.6, capped at 8,192 (our
assumption of such a dataset's shape, not a fit to one)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """Arrivals and lengths of one run's inference requests."""

    arrivals: object
    """PoissonArrivals, GammaArrivals or TraceArrivals."""
    lengths: object = CONVERSATION
    """LogNormalLengths or TraceLengths."""

    def requests(self, duration: float, seed: int) -> list[RequestSpec]:
        """The seeded request stream of ``duration`` seconds (arrivals and lengths from separate streams)."""
        if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
            raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
        times = self.arrivals.times(duration, np.random.default_rng([seed, 0]))
        p, o = self.lengths.sample(len(times), np.random.default_rng([seed, 1]))
        return [RequestSpec(arrival=float(t), prompt_tokens=int(a), output_tokens=int(b))
                for t, a, b in zip(times, p, o)]


def finetune_sequences(n: int, seed: int, lengths: LogNormal = REASONING, min_length: int = 64,
                       max_length: int = 8192) -> list[SequenceShape]:
    """``n`` seeded finetuning sequence shapes, lengths in [min_length, max_length]; every token but the last
    has a target (the loss tokens)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the finetuning dataset needs at least one sequence, got n={n!r}")
    x = lengths.sample(n, np.random.default_rng([seed, 2]), min_length, max_length)
    return [SequenceShape(length=int(v), num_loss_tokens=int(v) - 1) for v in x]


def fixed_lengths(prompt_tokens: Sequence[int], output_tokens: Sequence[int]) -> TraceLengths:
    """Given lengths, in order (e.g. the requests of a real run being replayed)."""
    rows = tuple(TraceRow(0.0, int(p), int(o)) for p, o in zip(prompt_tokens, output_tokens))
    if not rows:
        raise ValueError("fixed_lengths needs at least one request")
    return TraceLengths(rows, max_total=max(r.prompt_tokens + r.output_tokens for r in rows) + 1)
