"""The simulated engine is the engine with its executor swapped: the same scheduler code makes the same batches."""
import logging

import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.policies import CoServePolicy, TemporalPolicy
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.engine import Engine, EngineConfig
from flexc.runtime.executor import Executor
from flexc.runtime.latency import IterationWork, LatencyModel
from flexc.runtime.scheduler import Scheduler
from flexc.runtime.simulator.cost import MeasuredCost
from flexc.runtime.simulator.engine import SimulatedEngine, SimulatedExecutor, SimulatedSequence, fit_policy_latency
from flexc.runtime.simulator.workload import SequenceShape
from tests.utils import write_config

LAYERS = 3
COEF = [0.0, 0.01, 0.01, 0.0, 0.01, 0.002 * LAYERS, 0.0, 0.0, 0.0, 0.0, 0.0]
"""A fixed latency model (seconds per decode/prefill/finetuning token, backward per token and layer)."""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    src = resolve_model(write_config(tmp_path_factory.mktemp("cfg"), "llama"))
    spec = LoraSpec(r=4, alpha=8)
    return src, spec, flexc.compile(src, lora=spec, seq_len=16)


def _policy(name):
    if name == "coserve":
        return CoServePolicy(LatencyModel(LAYERS, coef=COEF), tpot_slo=0.1)
    return TemporalPolicy(interval=2)


def _record_batches(engine):
    """Wrap the scheduler's schedule() to keep what every batch held (ids and counts, no tokens)."""
    seen = []
    schedule = engine.scheduler.schedule

    def wrapped():
        out = schedule()
        seen.append(([(s.req_id, s.kind.value, len(s.token_ids), s.num_computed_tokens, tuple(s.block_ids),
                       s.sample) for s in out.seqs], dict(out.finetune_backward)))
        return out
    engine.scheduler.schedule = wrapped
    return seen


PROMPTS = [5, 11, 3, 17, 8]
OUTPUTS = [6, 3, 9, 4, 7]
FT_LENGTHS = [14, 20, 9, 17]


def _drive(engine, submit):
    """Requests arrive over the first iterations (two at once, then one per step) beside a finetuning job."""
    pending = list(range(len(PROMPTS)))
    for i in pending[:2]:
        submit(i)
    pending = pending[2:]
    while engine.has_work():
        engine.step()
        if pending:
            submit(pending.pop(0))


@pytest.mark.parametrize("name", ["coserve", "temporal"])
def test_same_scheduler_same_batches(compiled, name):
    """A real engine and the simulated one, same policy class and requests, schedule identical batches (ids, kinds,
    token counts, KV blocks, backward windows) and make the same optimizer steps; only the executor differs."""
    src, spec, cm = compiled
    config = EngineConfig(kv_cache_tokens=1024, token_budget=12, block_size=4)
    real = Engine(cm, load_model(src, spec, "fp32", seed=5), config=config, policy=_policy(name))
    g = torch.Generator().manual_seed(0)
    data = []
    for n in FT_LENGTHS:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        data.append(TrainingSequence(tuple(ids), tuple(ids[1:]) + (-100,)))
    real_job = real.finetune(data, adapter="ft", optimizer="sgd", lr=0.1, grad_accum=2)
    real_seen = _record_batches(real)
    _drive(real, lambda i: real.submit(torch.randint(0, 256, (PROMPTS[i],), generator=g).tolist(),
                                       max_new_tokens=OUTPUTS[i], ignore_eos=True, request_id=f"r{i}"))

    sim = SimulatedEngine(num_layers=LAYERS, cost=MeasuredCost(LatencyModel(LAYERS, coef=COEF)),
                          latency=LatencyModel(LAYERS), policy=_policy(name), config=config,
                          kv_blocks=1024 // 4, max_model_len=real.max_model_len)
    sim_job = sim.finetune([SequenceShape(length=n, num_loss_tokens=n - 1) for n in FT_LENGTHS], adapter="ft",
                           optimizer="sgd", lr=0.1, grad_accum=2)
    sim_seen = _record_batches(sim)
    _drive(sim, lambda i: sim.submit_spec(PROMPTS[i], OUTPUTS[i], f"r{i}"))

    assert type(sim.scheduler) is type(real.scheduler) is Scheduler
    assert type(sim.scheduler.policy) is type(real.scheduler.policy)
    assert isinstance(real.executor, Executor) and isinstance(sim.executor, SimulatedExecutor)
    assert any(bwd for _, bwd in real_seen) and any(k == "finetune" for seqs, _ in real_seen for _, k, *_ in seqs)
    assert sim_seen == real_seen
    assert sim_job.step == real_job.step == len(FT_LENGTHS) // 2


def test_simulated_clock_moves_by_the_cost():
    """Each simulated iteration advances the clock by the cost model's seconds for its batch; tokens are stamped
    with it (TTFT and TPOT of a lone request are the iterations' costs)."""
    cost = MeasuredCost(LatencyModel(LAYERS, coef=[0.05, 0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    sim = SimulatedEngine(num_layers=LAYERS, cost=cost, latency=LatencyModel(LAYERS), policy="inference_only",
                          config=EngineConfig(token_budget=64, block_size=4), kv_blocks=64, max_model_len=512)
    rid = sim.submit_spec(20, 3, "r0")
    sim.run_until_idle()
    res = sim.result(rid)
    assert res.ttft == pytest.approx(0.05 + 20 * 0.001)          # one prefill iteration of 20 tokens
    assert res.tpot == pytest.approx(0.05 + 0.01)                # then decodes of one token
    assert sim.sim_clock.now == pytest.approx(res.ttft + 2 * res.tpot)


def test_simulated_engine_keeps_drift_out_of_the_log(caplog):
    """A policy model that predicts twice the cost model's seconds: the simulated engine's model records the drift
    (ratio about 0.5) but logs no warning about a machine (there is none)."""
    coef = [0.05, 0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    latency = LatencyModel(LAYERS, coef=[2 * c for c in coef])
    sim = SimulatedEngine(num_layers=LAYERS, cost=MeasuredCost(LatencyModel(LAYERS, coef=coef)), latency=latency,
                          policy="inference_only", config=EngineConfig(token_budget=64, block_size=4), kv_blocks=64,
                          max_model_len=512)
    rid = sim.submit_spec(8, 40, "r0")
    with caplog.at_level(logging.DEBUG, logger="flexc.runtime.latency"):
        sim.run_until_idle()
    assert len(sim.result(rid).token_ids) == 40
    assert latency.drift is not None and latency.drift.ratio == pytest.approx(0.5, rel=0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("profiled time" in r.message for r in caplog.records)


def test_simulated_sequence_progress():
    """A tensor-free sequence goes through chunks and top-down backward windows like the real one."""
    fs = SimulatedSequence(10, 4, "job/0")
    start, ids, pos = fs.next_chunk(6)
    assert (start, ids, pos) == (0, [0] * 6, list(range(6))) and not fs.in_backward
    fs.forward_completed(0, 6)
    start, ids, _ = fs.next_chunk(6)              # only 4 are left
    assert (start, len(ids)) == (6, 4)
    fs.forward_completed(6, 4)
    assert fs.in_backward and not fs.done
    assert fs.backward_window(None, 3).layers == [3, 2, 1] and fs.head_done
    assert fs.backward_window(None, 3).layers == [0] and fs.done


def test_policy_latency_fit_reproduces_a_linear_cost():
    """The start-up fit over the simulated profile recovers a cost that is linear in the runtime's features."""
    truth = LatencyModel(LAYERS, coef=[0.01, 2e-4, 5e-5, 1e-9, 6e-5, 3e-4, 0.0, 1e-4, 0.0, 0.02, 0.005])
    fitted = fit_policy_latency(MeasuredCost(truth), num_layers=LAYERS, token_budget=64, seq_len=512)
    w = IterationWork(decode_tokens=7, prefill_tokens=30, attention_pairs=900, ft_forward_tokens=20,
                      ft_backward_layer_tokens=300, ft_backward_layers=1, ft_loss_tokens=300)
    assert fitted.predict(w) == pytest.approx(truth.predict(w), rel=1e-6)
