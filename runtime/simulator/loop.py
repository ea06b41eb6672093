"""The discrete-event loop: a heap of timestamped events, one loop, one small class per event.

As in Vidur's simulator, time jumps from event to event; nothing sleeps. The
events are few because the engine's own step does the work:

* :class:`RequestArrival`: a request reaches the engine (``engine.submit`` stamped at its arrival time);
  an idle engine wakes up;
* :class:`Iteration`: the engine runs one iteration (``engine.step``: the real scheduler and policy choose the
  batch, the simulated executor prices it and moves the clock by its duration); the next iteration is due
  when this one ends, or at the next arrival if nothing is left to run;
* :class:`MeasurementEnd`: the end of the measured window (arrivals stop; what finishes after it still counts
  for the requests that arrived before it).

Time order and call order: an iteration applies its results when it is
handled and stamps them with its end time; an arrival due while that iteration
was in flight is handled afterwards with the clock set back to its own time.
That is exact, not an approximation: an arrival only enters the waiting queue,
which the scheduler reads at the next iteration (the real engine does the same
between steps).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Callable, Optional, Protocol

__all__ = ["SimClock", "Event", "RequestArrival", "Iteration", "MeasurementEnd", "EventLoop", "Simulated"]


class SimClock:
    """Simulated seconds; the engine reads it as its ``clock``."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"an iteration cannot take {seconds!r} seconds")
        self.now += seconds


class Simulated(Protocol):
    """What the events act on (``run.InstanceRun``): the engine, its clock and the requests."""

    clock: SimClock
    finished: bool
    """Nothing is left to simulate (the loop stops)."""

    def arrive(self, index: int) -> None:
        """Submit request ``index`` at the clock's time."""

    def step(self) -> bool:
        """Run one iteration; whether another one is due right after it."""

    def end_measurement(self) -> None:
        """The measured window is over."""


@dataclasses.dataclass
class Event:
    """Something that happens at ``time``; at equal times events run by ``priority`` (lower first), then in the
    order they were pushed."""

    time: float

    priority = 1

    def handle(self, run: "Simulated", loop: "EventLoop") -> None:
        raise NotImplementedError


@dataclasses.dataclass
class RequestArrival(Event):
    """Request ``index`` of the workload arrives (before an iteration due at the same time: it may join it)."""

    index: int = 0

    priority = 0

    def handle(self, run: "Simulated", loop: "EventLoop") -> None:
        run.arrive(self.index)
        if not loop.iteration_pending:
            loop.push(Iteration(self.time))


@dataclasses.dataclass
class Iteration(Event):
    """The engine runs one iteration starting at ``time``."""

    def handle(self, run: "Simulated", loop: "EventLoop") -> None:
        loop.iteration_pending = False
        if run.step():
            loop.push(Iteration(run.clock.now))


@dataclasses.dataclass
class MeasurementEnd(Event):
    """The end of the measured window."""

    priority = 2

    def handle(self, run: "Simulated", loop: "EventLoop") -> None:
        run.end_measurement()


class EventLoop:
    """The heap and the loop."""

    def __init__(self, run: Simulated):
        self.run = run
        self._heap: list[tuple[float, int, int, Event]] = []
        self._seq = itertools.count()
        self.iteration_pending = False
        """An :class:`Iteration` is in the heap (the engine is busy or about to start)."""

    def push(self, event: Event) -> None:
        if isinstance(event, Iteration):
            self.iteration_pending = True
        heapq.heappush(self._heap, (event.time, event.priority, next(self._seq), event))

    def run_until(self, deadline: float, on_event: Optional[Callable[[float], None]] = None) -> None:
        """Handle events in time order until none is left, the clock passes ``deadline`` or ``run.finished``."""
        clock = self.run.clock
        while self._heap and not self.run.finished:
            if self._heap[0][0] > deadline:
                break
            event = heapq.heappop(self._heap)[3]
            clock.now = event.time
            event.handle(self.run, self)
            if on_event is not None:
                on_event(clock.now)
