"""A simulated run builds its engine and co-serving policy from the SimulationConfig: the finetuning floor included."""
import pytest

from flexc.runtime.latency import LatencyModel
from flexc.runtime.simulator.run import SimulationConfig, _engine, measured_instance, simulate_instance
from flexc.runtime.simulator.workload import RequestSpec, SequenceShape

LAYERS = 4
SLOW = LatencyModel(LAYERS, coef=[0.05, 1e-3, 1e-3, 0.0, 1e-3, 1e-4, 0.0, 0.0, 0.0, 0.0, 0.0])
"""50 ms an iteration before any token: above the 10 ms TPOT target below, so no finetuning ever fits beside
inference."""


def _config(share: float) -> SimulationConfig:
    # NOTE: one request every 0.5 s, each decoding 40 tokens (>= 2 s): the engine is never idle in the window
    reqs = [RequestSpec(arrival=0.5 * i, prompt_tokens=8, output_tokens=40) for i in range(40)]
    return SimulationConfig(rates=(2.0,), policies=("coserve",), duration=20.0, drain=0.0, requests=reqs,
                            tpot_slo=0.01, token_budget=64, min_finetune_share=share,
                            finetune=[SequenceShape(length=96, num_loss_tokens=95)] * 8, grad_accum=2)


def test_floor_reaches_engine_and_policy():
    """The configured floor is the engine's and the co-serving policy's."""
    spec = measured_instance(SLOW, kv_tokens=8192, max_model_len=512)
    engine = _engine(spec, _config(0.25), "coserve")
    assert engine.config.min_finetune_share == 0.25
    assert engine.scheduler.policy.min_finetune_share == 0.25


def test_floor_keeps_finetuning_going_under_constant_load():
    """With inference alone over the TPOT target, finetuning moves only through the floor: none in the window
    without it, the floor's share of every iteration's budget with it (forward tokens and backward layers)."""
    spec = measured_instance(SLOW, kv_tokens=8192, max_model_len=512)
    strict = simulate_instance(spec, _config(0.0), "coserve", 2.0)
    floored = simulate_instance(spec, _config(0.25), "coserve", 2.0)
    assert strict.finetune_tokens_per_s == 0 and strict.notes["optimizer_steps"] == 0
    assert floored.finetune_tokens_per_s > 0 and floored.notes["optimizer_steps"] >= 1


def test_bad_floor_is_a_value_error():
    """A floor outside [0, 1] is refused, naming the value."""
    with pytest.raises(ValueError, match="min_finetune_share must be a fraction in \\[0, 1\\], got 1.5"):
        SimulationConfig(min_finetune_share=1.5)
