"""The simulator: the engine's real scheduler, policies, KV cache manager and finetuning jobs over a simulated
executor and clock, iterations priced by a cost model.

engine.py      the Engine with its executor swapped (SimulatedEngine, SimulatedExecutor, SimulatedSequence)
loop.py        the discrete-event loop (SimClock, RequestArrival, Iteration, MeasurementEnd)
cost.py        cost models behind one interface: MeasuredCost (a fitted LatencyModel), RooflineCost
roofline.py    per-kernel FLOPs and bytes of the compiled graphs, collectives of the tp plan
hardware.py    the GPU table (a100-80gb, h100, h200, JSON for others)
workload.py    seeded arrivals (Poisson, gamma, trace) and lengths (log-normal, trace), finetuning data
run.py         one simulated run and the grid of rates x policies (separate composed of two instances)
report.py      results, the table, the paper-shaped figure
validation.py  the same load on a real engine and on the simulated one

The front door is ``flexc simulate`` / :func:`flexc.simulate.simulate`.
"""
