"""Co-serving policies: finetuning tokens in the same serving-graph calls as inference give PEFT's adapter."""
import copy

import numpy as np
import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.policies import CoServePolicy, FinetuneOnlyPolicy, TemporalPolicy, make_policy
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.engine import Engine, EngineConfig
from flexc.runtime.latency import IterationWork, LatencyModel
from flexc.runtime.latency_checks import check_fit, flop_costs, profile_context
from tests.utils import rel_err, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    src = resolve_model(write_config(tmp_path_factory.mktemp("cfg"), "llama"))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    return src, spec, cm


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (int(torch.randint(14, 21, (1,), generator=g)),), generator=g).tolist()
        labels = ids[1:] + [-100]
        labels[:3] = [-100] * 3
        out.append(TrainingSequence(tuple(ids), tuple(labels)))
    return out


def _policy(num_layers):
    # seconds: decode 0.01/token, prefill 0.01/token, finetuning forward 0.01/token, backward 0.002 * tokens * layers
    lat = LatencyModel(num_layers, coef=[0.0, 0.01, 0.01, 0.0, 0.01, 0.002 * num_layers, 0.0, 0.0, 0.0, 0.0, 0.0])
    return CoServePolicy(lat, tpot_slo=0.1)


def _peft_sgd(model, init, data, lr, grad_accum):
    """PEFT from the adapter weights ``init``, trained with SGD and ordinary loss.backward()."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
    model.get_base_model().set_attn_implementation("sdpa")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.SGD(params, lr=lr)
    for step in range(len(data) // grad_accum):
        opt.zero_grad()
        for s in data[step * grad_accum:(step + 1) * grad_accum]:
            out = model(input_ids=torch.tensor([s.input_ids]))
            loss = torch.nn.functional.cross_entropy(out.logits[0], torch.tensor(s.labels), ignore_index=-100)
            (loss / grad_accum).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


# NOTE: the Inductor case shares its worker with test_executor.py's (the same serving graph: one of them compiles)
@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.xdist_group("tiny-inductor"))])
def test_coserved_sgd_equals_peft(setup, tmp_path, backend):
    """SGD steps co-served with inference requests (chunked forward, windowed backward) equal PEFT's adapter, with
    the serving graphs run as captured or compiled by Inductor (once, for every batch shape); the saved adapter
    loads in PEFT and generates the engine's tokens."""
    src, spec, cm = setup
    model = load_model(src, spec, "fp32", seed=5)
    engine = Engine(cm, model, config=EngineConfig(kv_cache_tokens=1024, token_budget=12, block_size=4,
                                                   backend=backend), policy=_policy(3))
    data = _data(4)
    job = engine.finetune(data, adapter="ft", optimizer="sgd", lr=0.5, grad_accum=2, seed=3)
    init = {k: v.clone() for k, v in engine.adapters.get("ft").weights.items()}
    calls = []
    for i, call in enumerate(engine.executor._layers):
        call.fn = lambda *v, f=call.fn, i=i: calls.append(i) or f(*v)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        engine.submit(torch.randint(0, 256, (5 + i,), generator=g).tolist(), max_new_tokens=8,
                      adapter=None if i % 2 else "ft", ignore_eos=True)
    engine.run_until_idle()
    assert job.status == "completed" and job.step == 2
    hist = engine.metrics().history
    assert any(h["ft_forward_tokens"] and h["decode_tokens"] for h in hist)          # mixed batches
    assert any(0 < h["ft_backward_layers"] < 3 for h in hist)                         # layer windows
    assert max(h["ft_forward_tokens"] for h in hist) < min(len(s) for s in data)      # chunked forward
    forward_iterations = sum(1 for h in hist if h["decode_tokens"] or h["prefill_tokens"] or h["ft_forward_tokens"])
    assert calls == [0, 1, 2] * forward_iterations      # one serving-graph call per layer, whatever the mix

    ref = _peft_sgd(load_model(src, spec, "fp32", seed=5), init, data, 0.5, 2)
    ours = engine.adapters.get("ft").weights
    assert any(rel_err(ours[n], init[n]) > 1e-3 for n in ref)
    for n in ref:
        assert rel_err(ours[n], ref[n]) < 1e-4, n

    from peft import PeftModel
    engine.save_adapter("ft", str(tmp_path / "ft"))
    base = load_model(src, None, "fp32", seed=5)
    base.set_attn_implementation("sdpa")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ft"))
    prompt = [7, 99, 3, 250, 12]
    res = engine.generate([prompt], max_new_tokens=6, adapter="ft", ignore_eos=True)[0]
    want = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               min_new_tokens=6)[0, 5:].tolist()
    assert res.token_ids == want
    # one compile served every batch: mixed ones, prefill chunks, decodes of one sequence (one token)
    assert engine.executor.graph_compiles == (backend == "inductor")


@pytest.mark.parametrize("name", ["temporal", "finetune_only"])
def test_baseline_policies_train_the_same(setup, name):
    """temporal and finetune_only reach the same adapter (they only schedule differently)."""
    src, spec, cm = setup
    results = []
    for policy in (_policy(3), make_policy(name)):
        model = load_model(src, spec, "fp32", seed=5)
        engine = Engine(cm, model, config=EngineConfig(kv_cache_tokens=1024, token_budget=12, block_size=4),
                        policy=policy)
        engine.finetune(_data(2, seed=4), adapter="ft", optimizer="sgd", lr=0.5, seed=3)
        if name == "temporal":
            engine.submit([1, 2, 3, 4], max_new_tokens=5, ignore_eos=True)
        engine.run_until_idle()
        results.append({k: v.clone() for k, v in engine.adapters.get("ft").weights.items()})
    for k in results[0]:
        assert rel_err(results[1][k], results[0][k]) < 1e-5


def test_failing_job_leaves_inference_alone(setup):
    """A job that fails (non-finite steps) is marked failed; the inference requests still finish."""
    src, spec, cm = setup
    model = load_model(src, spec, "fp32", seed=5)
    engine = Engine(cm, model, config=EngineConfig(kv_cache_tokens=1024, token_budget=12, block_size=4),
                    policy=_policy(3))
    job = engine.finetune(_data(3), adapter="ft", optimizer="sgd", lr=float("1e308"), max_nonfinite=1, seed=3)
    with torch.no_grad():
        for t in engine.adapters.get("ft").weights.values():
            t.fill_(float("nan"))      # every gradient becomes non-finite
    rid = engine.submit([5, 6, 7], max_new_tokens=4, ignore_eos=True)
    engine.run_until_idle()
    assert job.status == "failed" and job.skipped_steps == [0]
    assert len(engine.result(rid).token_ids) == 4


def test_policy_names():
    """Unknown policy names are ValueErrors listing the allowed ones."""
    with pytest.raises(ValueError, match="allowed: coserve, temporal, inference_only, finetune_only"):
        make_policy("fifo")
    assert isinstance(make_policy("temporal"), TemporalPolicy)
    assert isinstance(make_policy("finetune_only"), FinetuneOnlyPolicy)


def test_coserved_sgd_equals_peft_smollm2(smollm2_lora):
    """On the embedded SmolLM2-135M: two co-served SGD steps (chunked, windowed, beside inference) equal PEFT's."""
    cm = smollm2_lora.compiled
    model = copy.deepcopy(smollm2_lora.model)
    engine = Engine(cm, model, config=EngineConfig(kv_cache_tokens=512, token_budget=12, block_size=4),
                    policy=_policy(30))
    g = torch.Generator().manual_seed(2)
    data = []
    for n in (17, 22):
        ids = torch.randint(0, 49152, (n,), generator=g).tolist()
        data.append(TrainingSequence(tuple(ids), tuple(ids[1:]) + (-100,)))
    engine.load_adapter("ft", seed=1, init="random")      # B != 0, so both LoRA factors get gradients
    init = {k: v.clone() for k, v in engine.adapters.get("ft").weights.items()}
    engine.finetune(data, adapter="ft", optimizer="sgd", lr=0.5, seed=1)
    engine.submit([1, 2, 3, 4, 5], max_new_tokens=6, ignore_eos=True)
    engine.submit([9, 8, 7], max_new_tokens=6, adapter="ft", ignore_eos=True)
    engine.run_until_idle()
    hist = engine.metrics().history
    assert any(0 < h["ft_backward_layers"] < 30 for h in hist)
    ref = _peft_sgd(copy.deepcopy(smollm2_lora.model), init, data, 0.5, 1)
    ours = engine.adapters.get("ft").weights
    # NOTE: all 420 LoRA tensors together within 1e-4; one small tensor alone may sit ~1e-4 off after 30 layers of
    # fp32 rounding in another order (tests/runtime/test_regions.py measures that against fp64)
    flat = lambda ws: torch.cat([ws[n].flatten() for n in ref])           # noqa: E731
    assert rel_err(flat(ours), flat(ref)) < 1e-4
    for n in ref:
        assert rel_err(ours[n], ref[n]) < 3e-4, n


def test_policy_fill_follows_measured_underprediction():
    """Co-served iterations measured slower than predicted shrink what the policy fills up to; other
    iterations (inference or finetuning alone) and faster ones leave it at the budget."""
    pol = _policy(4)
    mixed = IterationWork(decode_tokens=4, ft_forward_tokens=4)      # predicted 0.08 s
    pol.observe(IterationWork(ft_forward_tokens=8), 1.0)
    pol.observe(mixed, 0.04)
    assert pol.fill_s == pytest.approx(pol.budget_s)
    for _ in range(50):
        pol.observe(mixed, 0.12)
    assert pol.fill_s == pytest.approx(pol.budget_s / 1.5, rel=0.02)


@pytest.fixture()
def one_thread():
    """One torch thread: on this shared 2-core machine two threads contend with other processes and a tiny
    model's iteration takes ~25x longer (0.4 s instead of 16 ms, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _busy_engine(cm, src, spec, policy, **cfg):
    """An engine with a finetuning job and four requests whose decodes keep inference in every iteration."""
    engine = Engine(cm, load_model(src, spec, "fp32", seed=5),
                    config=EngineConfig(kv_cache_tokens=2048, token_budget=20, block_size=4, **cfg), policy=policy)
    job = engine.finetune(_data(2), adapter="ft", optimizer="sgd", lr=0.1, seed=3)
    g = torch.Generator().manual_seed(7)
    rids = [engine.submit(torch.randint(0, 256, (4,), generator=g).tolist(), max_new_tokens=120, ignore_eos=True)
            for _ in range(4)]
    return engine, job, rids


@pytest.mark.parametrize("share", [0.1, 0.0])
def test_finetuning_progresses_under_the_floor(setup, share, one_thread):
    """With a TPOT SLO no iteration can meet (1 us), a floor of 10% of the token budget takes the job through a
    whole optimizer step while every iteration also decodes; without a floor (0) no finetuning runs beside
    inference. Every miss is put down to inference (its part alone is predicted over the SLO)."""
    src, spec, cm = setup
    lat = LatencyModel(3, coef=[0.0, 0.01, 0.01, 0.0, 0.01, 0.006, 0.0, 0.0, 0.0, 0.0, 0.0])
    engine, job, rids = _busy_engine(cm, src, spec, CoServePolicy(lat, tpot_slo=1e-6, min_finetune_share=share),
                                     tpot_slo=1e-6)
    for _ in range(60 if share else 16):
        engine.step()
        if job.step >= 1:
            break
    hist = engine.metrics().history
    assert all(h["decode_tokens"] or h["prefill_tokens"] for h in hist)
    if share:
        assert job.step >= 1, (job.status, len(hist))
        assert all(h["ft_forward_tokens"] >= 2 or h["ft_backward_layers"] >= 1 for h in hist[1:])
    else:
        assert job.step == 0 and not any(h["ft_forward_tokens"] or h["ft_backward_layers"] for h in hist)
    m = engine.metrics()
    assert m.slo_miss_iterations == len(hist) == m.slo_miss_inference


BOUND = 40
"""Iterations within which a wrong (plausible) profile is corrected: a drift window, its half-window follow-up, a
window to judge the predictions by."""


def test_wrong_profiles_refused_or_corrected(setup, tmp_path, one_thread):
    """On a real engine: the issue's degenerate profile (big constant, zero finetuning costs) saved in this context
    is refused and profiled again; a self-consistent profile 10x too fast or 10x too slow is loaded (it passes the
    FLOP bounds), then within one drift window (16 iterations) the drift is reported and the model rescaled, and
    by BOUND iterations (the last window of them) it predicts within 2x (the machine is shared: timings are
    noisy, and the mix of work changes once the policy plans with the rescaled model)."""
    src, spec, cm = setup
    path = str(tmp_path / "lat.json")
    ctx = profile_context(cm, dtype=torch.float32, device=torch.device("cpu"), backend="eager")
    costs = flop_costs(cm, torch.device("cpu"))
    bad = LatencyModel(3, [0.36, 1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    bad.set_profile(bad.coef, [(w.features(3), 0.36) for w in
                               (IterationWork(decode_tokens=d, prefill_tokens=p) for d in (1, 8, 32) for p in range(6))])
    bad.save(path, ctx.to_dict())
    engine, job, rids = _busy_engine(cm, src, spec, "coserve", latency_profile=path, tpot_slo=0.05)
    assert engine.latency.source in ("profiled", "corrected")
    assert not check_fit(engine.latency.coef, costs)
    sane = engine.latency.coef.copy()
    window = engine.latency.drift_window
    for factor in (0.1, 10.0):
        wrong = LatencyModel(3, sane * factor)
        wrong.set_profile(wrong.coef, [(f, float(wrong.coef @ f)) for f, _ in engine.latency.samples])
        wrong.save(path, ctx.to_dict())
        assert engine.fit_latency_model().source == "loaded"
        assert engine.latency.coef == pytest.approx(sane * factor)
        n0 = len(engine.metrics().history)
        for i in range(BOUND):
            engine.step()
            if i == window - 1:
                assert engine.latency.adaptations >= 1 and engine.latency.drift is not None, factor
                assert (engine.latency.drift.ratio > 3) == (factor < 1), engine.latency.drift
        hist = engine.metrics().history[n0 + BOUND - window:]
        ratio = float(np.median([h["seconds"] / h["predicted_s"] for h in hist]))
        assert 0.5 < ratio < 2, (factor, ratio)
    assert len(engine.scheduler.running) == 4 or all(engine.result(r) for r in rids)
