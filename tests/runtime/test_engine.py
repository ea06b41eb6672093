"""Engine end to end: greedy parity with transformers / PEFT, chunked prefill, preemption, multi-LoRA, bad requests."""
import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.engine import Engine, EngineConfig, resolve_device
from tests.runtime.utils import hf_greedy, save_tiny_adapter, save_tiny_model


def _prompts(lens, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def _ref_model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """A saved tiny model, its transformers reference, and one compile + load shared by the module's engines."""
    d = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    src = resolve_model(d)
    compiled = flexc.compile(src, lora=None, dtype="fp32", builtin_passes=("serve",))
    return d, _ref_model(d), compiled, load_model(src, None, "fp32")


def _engine(tiny, **config):
    return Engine(tiny[2], tiny[3], config=EngineConfig(**config))


LENS, NEWS = [5, 23, 40, 9, 14], [12, 6, 9, 16, 1]


def _check_parity(results, ref, prompts, news):
    eos = ref.generation_config.eos_token_id
    for r, p, m in zip(results, prompts, news):
        assert r.error is None
        assert r.token_ids == hf_greedy(ref, p, m, eos), r.request_id


def test_greedy_matches_transformers_with_chunked_prefill(tiny):
    """Different-length requests batched together, prompts split into chunks by a small token budget, give the
    same greedy tokens as transformers generate() on each prompt alone."""
    engine = _engine(tiny, kv_cache_tokens=1024, token_budget=16)
    prompts = _prompts(LENS)
    res = engine.generate(prompts, max_new_tokens=NEWS)
    _check_parity(res, tiny[1], prompts, NEWS)
    assert all(r.ttft > 0 for r in res) and all(r.tpot >= 0 for r in res)


def test_greedy_matches_transformers_under_preemption(tiny):
    """A KV cache too small for all requests forces preemptions; recomputed requests still match transformers."""
    engine = _engine(tiny, kv_cache_tokens=64, block_size=4, token_budget=32)
    prompts = _prompts(LENS, seed=1)
    res = engine.generate(prompts, max_new_tokens=NEWS)
    assert sum(r.num_preemptions for r in res) > 0
    _check_parity(res, tiny[1], prompts, NEWS)


def test_reference_kernels_give_same_tokens(tiny, monkeypatch):
    """With the kernels' torch references (FLEXC_KERNELS=torch) instead of the fused CPU attention, the
    tokens still match transformers."""
    monkeypatch.setenv("FLEXC_KERNELS", "torch")
    engine = _engine(tiny, kv_cache_tokens=1024, token_budget=16)
    prompts = _prompts(LENS, seed=2)
    _check_parity(engine.generate(prompts, max_new_tokens=NEWS), tiny[1], prompts, NEWS)


def test_device_choice_and_errors(tiny):
    """'auto' picks the CPU here; bad or absent devices and unknown backends are ValueErrors."""
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", ""):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    engine = _engine(tiny, kv_cache_tokens=256)
    assert engine.executor.k_caches[0].device.type == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        EngineConfig(backend="tvm")


@pytest.fixture(scope="module")
def smollm2(smollm2_lora):
    """An engine on the shared SmolLM2 (its requests use no adapter) and, as the reference, transformers' model with
    PEFT's adapter disabled (the base model itself)."""
    s = smollm2_lora
    engine = Engine(s.compiled, s.model, tokenizer=s.tokenizer,
                    config=EngineConfig(kv_cache_tokens=2048, token_budget=16))
    return engine, s.model


def test_smollm2_greedy_matches_transformers(smollm2):
    """smollm2-135m: text, chat-template and token-id prompts of different lengths batched together (the longest
    split into chunks) give transformers' greedy tokens, and text is their decoding."""
    engine, ref = smollm2
    tok = engine.tokenizer
    texts = ["The capital of France is", "Write one sentence about the sea, the wind and the boats that sail "
             "between the islands of the north when the summer ends and the light fades."]
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    res = engine.generate(texts, max_new_tokens=[10, 6])
    res += engine.generate(["What is 2+2?"], max_new_tokens=8, chat=True)
    prompts = [tok.encode(texts[0]), tok.encode(texts[1]), chat]
    assert res[2].prompt_token_ids == chat
    base = ref.get_base_model()
    attn = base.config._attn_implementation
    base.set_attn_implementation("sdpa")
    try:
        with ref.disable_adapter():
            want = [hf_greedy(ref, p, m, ref.generation_config.eos_token_id) for p, m in zip(prompts, [10, 6, 8])]
    finally:
        base.set_attn_implementation(attn)
    for r, p, w in zip(res, prompts, want):
        assert r.token_ids == w
        assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    full = res[0].text
    word = full.split()[1]
    cut = engine.generate(texts[0], max_new_tokens=10, stop=word)[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(word)]


def test_smollm2_inductor_gives_eager_tokens(smollm2):
    """The embedded model's serving graph compiled by Inductor (dynamic in the token count) gives the eager
    engine's greedy tokens (transformers', test_smollm2_greedy_matches_transformers) for a batch of prompts of
    different lengths and for one prompt alone (one compile serves both), and the compile time is reported. The
    tiny configs' Inductor tokens, with an adapter being trained, equal PEFT's
    (tests/runtime/test_policies.py::test_coserved_sgd_equals_peft[inductor])."""
    eager, _ = smollm2
    engine = Engine(eager.compiled, eager.model, tokenizer=eager.tokenizer,
                    config=EngineConfig(kv_cache_tokens=2048, token_budget=16, backend="inductor"))
    prompts = ["The capital of France is", "List three colours:", "Once upon a time, in a small village by the sea,"]
    want = [r.token_ids for r in eager.generate(prompts, max_new_tokens=6)]
    assert [r.token_ids for r in engine.generate(prompts, max_new_tokens=6)] == want
    assert engine.generate(prompts[1], max_new_tokens=3)[0].token_ids == want[1][:3]   # decodes of one token
    assert engine.executor.compile_seconds > 0 and engine.executor.graph_compiles == 1


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    d = save_tiny_model(root, "llama")
    a = save_tiny_adapter(d, str(root / "a"), seed=1)
    b = save_tiny_adapter(d, str(root / "b"), seed=2, targets=("q_proj", "v_proj"))   # subset of the targets
    engine = flexc.Engine.from_pretrained(d, lora=LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")),
                                          max_adapters=2, kv_cache_tokens=2048, token_budget=64)
    engine.load_adapter("a", a)
    engine.load_adapter("b", b)
    return d, a, b, engine


def test_adapters_mixed_in_one_batch_match_peft(lora_setup):
    """Requests for adapter a, adapter b and no adapter in one batch each match PEFT's model for that adapter."""
    from peft import PeftModel
    d, a, b, engine = lora_setup
    prompts = _prompts([7, 19, 11, 30, 4, 13], seed=3)
    adapters = ["a", "b", None, "a", None, "b"]
    news = [8, 5, 10, 6, 9, 7]
    seen = []
    execute = engine.executor.execute
    engine.executor.execute = lambda b, ft=None: seen.append({s.adapter_id for s in b.seqs}) or execute(b, ft)
    try:
        res = engine.generate(prompts, max_new_tokens=news, adapter=adapters)
    finally:
        del engine.executor.execute
    assert max(map(len, seen)) == 3                      # a, b and no adapter ran in the same batch
    refs = {None: _ref_model(d), "a": PeftModel.from_pretrained(_ref_model(d), a).eval(),
            "b": PeftModel.from_pretrained(_ref_model(d), b).eval()}
    for r, p, m, ad in zip(res, prompts, news, adapters):
        eos = refs[ad].generation_config.eos_token_id
        assert r.adapter == ad and r.token_ids == hf_greedy(refs[ad], p, m, eos)
    assert not engine.has_unfinished_requests()
    # the adapters really change the output (the comparison is not vacuous)
    assert engine.generate(prompts[0], max_new_tokens=8)[0].token_ids != res[0].token_ids


def test_adapter_mismatch_and_capacity_errors(lora_setup, tmp_path):
    """An adapter of a rank above the compiled one or with targets the compiled model lacks, or one too many, is a
    clear ValueError."""
    d, a, b, engine = lora_setup
    with pytest.raises(ValueError, match="rank r=8 is not served: this engine serves ranks 1 to 4"):
        engine.load_adapter("r8", save_tiny_adapter(d, str(tmp_path / "r8"), seed=3, r=8))
    with pytest.raises(ValueError, match=r"targets \['o_proj'\] are not in the compiled targets"):
        engine.load_adapter("o", save_tiny_adapter(d, str(tmp_path / "o"), seed=3, targets=("q_proj", "o_proj")))
    with pytest.raises(ValueError, match="max_adapters=2"):
        engine.load_adapter("c", a)
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        engine.load_adapter("b", str(tmp_path))


def test_bad_requests_raise_and_queue_nothing(lora_setup):
    """Empty prompt, prompt as long as the context, unknown adapter and max_new_tokens <= 0 raise ValueError from
    generate as from submit, naming the prompt; nothing stays queued and the next call serves normally."""
    d, a, b, engine = lora_setup
    good = _prompts([6, 9], seed=4)
    cases = [([good[0], []], {}, "prompt 1: .*prompt is empty"),
             ([good[0], [5] * 512], {}, "prompt 1: .*prompt has 512 tokens; the model's context is 512"),
             ([good[0], good[1]], dict(adapter=[None, "zzz"]), "unknown adapter 'zzz'.*'a'"),
             ([good[0], good[1]], dict(max_new_tokens=[4, 0]), "prompt 1: .*max_new_tokens must be a positive "
                                                                "integer, got 0")]
    for prompts, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            engine.generate(prompts, **kw)
        assert not engine.has_unfinished_requests()
    res = engine.generate(good, max_new_tokens=4)
    assert all(r.error is None and 0 < len(r.token_ids) <= 4 for r in res)
    for kw in (dict(max_new_tokens=-1), dict(adapter="nope"), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            engine.submit(good[0], **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 999])
    assert not engine.has_unfinished_requests()


def test_result_is_readable_until_released(lora_setup):
    """result() gives the same answer on every call until release(); then the id is unknown."""
    d, a, b, engine = lora_setup
    rid = engine.submit(_prompts([7], seed=9)[0], max_new_tokens=3)
    with pytest.raises(ValueError, match="has not finished"):
        engine.result(rid)
    engine.run_until_idle()
    first, again = engine.result(rid), engine.result(rid)
    assert first == again and len(first.token_ids) >= 1
    engine.release(rid)
    with pytest.raises(ValueError, match="unknown request id"):
        engine.result(rid)


def test_streaming_matches_generate(lora_setup):
    """submit + stream yields, token by token, what generate returns for the same request."""
    d, a, b, engine = lora_setup
    p = _prompts([12], seed=5)[0]
    want = engine.generate(p, max_new_tokens=6, adapter="a")[0].token_ids
    rid = engine.submit(p, max_new_tokens=6, adapter="a")
    other = engine.submit(p, max_new_tokens=3)
    events = list(engine.stream(rid))
    assert [e.token_id for e in events] == want
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert engine.result(rid).token_ids == want
    while engine.has_unfinished_requests():
        engine.step()
    assert len(engine.result(other).token_ids) <= 3


def test_sampling_is_seeded_and_stop_ids_end_requests(lora_setup):
    """temperature > 0 with a seed is reproducible; a stop token id ends the request with that token."""
    d, a, b, engine = lora_setup
    p = _prompts([10], seed=6)[0]
    x = engine.generate([p, p], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    y = engine.generate([p, p], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    assert [r.token_ids for r in x] == [r.token_ids for r in y]
    greedy = engine.generate(p, max_new_tokens=12, ignore_eos=True)[0].token_ids
    stop = greedy[3]
    r = engine.generate(p, max_new_tokens=12, stop=stop, ignore_eos=True)[0]
    assert r.token_ids == greedy[:greedy.index(stop) + 1] and r.finish_reason == "stop"


def test_fresh_adapters_and_folded_alpha(lora_setup, tmp_path):
    """A fresh PEFT-initialised adapter (B = 0) gives the base model's tokens, a random one does not, and an
    adapter with another lora_alpha (scaling folded into B) still matches PEFT."""
    from peft import PeftModel
    d, a, b, engine = lora_setup
    other = Engine(engine.compiled, engine.model, config=EngineConfig(max_adapters=3, kv_cache_tokens=512))
    other.load_adapter("fresh")
    other.load_adapter("noisy", init="random", seed=3)
    alpha16 = save_tiny_adapter(d, str(tmp_path / "a16"), seed=4, alpha=16)
    other.load_adapter("a16", alpha16)
    p = _prompts([9], seed=7)[0]
    base, fresh, noisy, a16 = (other.generate(p, max_new_tokens=8, adapter=x)[0].token_ids
                               for x in (None, "fresh", "noisy", "a16"))
    assert fresh == base and noisy != base
    ref = PeftModel.from_pretrained(_ref_model(d), alpha16).eval()
    assert a16 == hf_greedy(ref, p, 8, ref.generation_config.eos_token_id)


def _training_data(n, seed=0):
    from flexc.runtime.dataset import TrainingSequence
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 256, (12,), generator=g).tolist()
        out.append(TrainingSequence(tuple(ids), tuple(ids[1:]) + (-100,)))
    return out


def test_lora_engine_without_policy_finetunes_to_the_end(lora_setup):
    """An engine with LoRA and no policy= co-serves by default: a queued job runs to completion in
    run_until_idle (which once looped forever under an inference-only default)."""
    engine = Engine(lora_setup[3].compiled, lora_setup[3].model, tokenizer=None,
                    config=EngineConfig(kv_cache_tokens=2048, token_budget=32, block_size=4, max_adapters=2))
    assert engine.scheduler.policy.name == "coserve"
    job = engine.finetune(_training_data(2), adapter="ft", optimizer="sgd", lr=0.1, seed=0)
    engine.submit([5, 6, 7], max_new_tokens=3, ignore_eos=True)
    engine.run_until_idle(progress=False)
    assert job.status == "completed" and job.step == 2 and not engine.has_work()


def test_finetune_checks_the_dataset_before_profiling(lora_setup, tmp_path, monkeypatch):
    """finetune(path) with a missing or malformed file raises the loader's ValueError (naming the path, or
    file:line) before the latency profiling a first finetune starts (made to raise here)."""
    engine = Engine(lora_setup[3].compiled, lora_setup[3].model, tokenizer=None,
                    config=EngineConfig(kv_cache_tokens=512, token_budget=32, block_size=4, max_adapters=2))
    assert engine._needs_latency_fit()

    def boom():
        raise AssertionError("profiled before the dataset was checked")
    monkeypatch.setattr(engine, "fit_latency_model", boom)
    with pytest.raises(ValueError, match="^dataset: no such file: .*nope.jsonl$"):
        engine.finetune(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2}\n')
    with pytest.raises(ValueError, match="^dataset: .*bad.jsonl:2: not valid JSON at character 20"):
        engine.finetune(str(bad))


def test_finetune_refused_or_stalled_loop_named(lora_setup):
    """finetune() under a policy that never finetunes is refused naming it; a policy that schedules nothing at
    all makes step() raise a no-progress error naming the stuck work instead of spinning."""
    cm, model = lora_setup[3].compiled, lora_setup[3].model
    cfg = EngineConfig(kv_cache_tokens=512, token_budget=32, block_size=4, max_adapters=2)
    engine = Engine(cm, model, config=cfg, policy="inference_only")
    with pytest.raises(ValueError, match="policy 'inference_only' never runs finetuning"):
        engine.finetune(_training_data(1), adapter="ft")

    class Idle:
        name = "idle"

        def schedule(self, sched):
            return []

    engine = Engine(cm, model, config=cfg, policy=Idle())
    job = engine.finetune(_training_data(1), adapter="ft", optimizer="sgd", lr=0.1)
    engine.submit([5, 6, 7], max_new_tokens=3)
    with pytest.raises(RuntimeError, match=r"no progress in 64 iterations: the scheduling policy 'idle' scheduled "
                                           r"nothing for 1 requests waiting.*finetuning job job-0 \(adapter 'ft'"):
        engine.run_until_idle()
    assert job.step == 0
