"""flexc serve as a real process on 127.0.0.1, driven by the official openai client: inference, adapters,
fine-tuning jobs, errors in OpenAI's shape, a client that goes away, and a SIGKILL restart mid-job."""
import concurrent.futures
import json
import os
import time

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

from tests.runtime.server.utils import ServerProcess, save_chat_model, write_chat_jsonl
from tests.runtime.utils import save_tiny_adapter
from tests.utils import rel_err

KEY = "sk-flexc-test"
BASE = "chat-model"
HYPER = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 100}     # lr 1e-2: the adapter visibly moves
QUESTION = [{"role": "user", "content": "What is fact 3?"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny chat model, PEFT adapters in an allowed directory (and one outside it), and a server with an API key,
    a module adapter, a 64 KiB body limit and checkpoints every 4 steps."""
    root = tmp_path_factory.mktemp("serve")
    model = save_chat_model(str(root))
    allowed = root / "adapters"
    allowed.mkdir()
    dirs = {"mod": save_tiny_adapter(model, str(allowed / "mod"), seed=1, r=4, targets=("q_proj", "v_proj")),
            "side": save_tiny_adapter(model, str(allowed / "side"), seed=2, r=2, alpha=16, targets=("down_proj",)),
            "big": save_tiny_adapter(model, str(allowed / "big"), seed=3, r=8, targets=("q_proj",)),
            "outside": save_tiny_adapter(model, str(root / "outside"), seed=4, r=2, targets=("q_proj",))}
    data = root / "data"
    (data / "jobs").mkdir(parents=True)
    srv = ServerProcess([model, "--data-dir", str(data), "--api-key", KEY, "--max-lora-rank", "4",
                         "--lora-targets", "q_proj,v_proj,down_proj", "--lora-modules", f"mod={dirs['mod']}",
                         "--allowed-lora-dir", str(allowed), "--allowed-lora-dir", str(data / "jobs"),
                         "--max-body-bytes", "65536", "--checkpoint-every", "4", "--max-adapters", "4"],
                        log_path=str(root / "server.log"))
    srv.start()
    yield {"srv": srv, "model": model, "dirs": dirs, "data": str(data), "root": root}
    srv.stop()


def _client(setup, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=setup["srv"].url + "/v1", api_key=key, max_retries=0, timeout=60)


def _post(setup, path, body=None, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(setup["srv"].url + path, json=body, content=content, headers=headers, timeout=60)


def _chat(client, model, max_tokens=8, messages=QUESTION):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


MARGIN = 1e-3
"""Logit gap below which greedy is a coin toss between two implementations (fp32 noise is ~1e-6)."""


def _peft_greedy(setup, adapter_dir, messages=QUESTION, max_new_tokens=8):
    """transformers + PEFT greedy on the chat-templated prompt, the independent reference of a reply: the
    generated ids and, per step, the gap between the two best logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(setup["model"])
    m = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    if adapter_dir is not None:
        m = PeftModel.from_pretrained(m, adapter_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out, gaps = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            top = m(input_ids=torch.tensor([ids + out])).logits[0, -1].topk(2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            if out[-1] == tok.eos_token_id:
                break
    return tok, out, gaps


def _assert_peft_reply(setup, reply, adapter_dir, min_tokens=3):
    """The server's greedy reply equals PEFT's up to the first near-tie of PEFT's logits (all of it if none), and
    that prefix has at least ``min_tokens`` tokens (so the check is not vacuous). Returns PEFT's token ids."""
    tok, out, gaps = _peft_greedy(setup, adapter_dir)
    k = next((i for i, g in enumerate(gaps) if g < MARGIN), len(out))
    assert k >= min(min_tokens, len(out)), gaps
    want = tok.decode(out[:k], skip_special_tokens=True)
    assert reply.startswith(want), (reply, want, gaps)
    if k == len(out):
        assert reply == tok.decode(out, skip_special_tokens=True)
    return out


def _error(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_models_completion_and_metrics(setup):
    """models.list shows the base model and the module adapter (parent, version); a greedy completion is
    deterministic and counts its tokens; /metrics exposes the vLLM-style names."""
    c = _client(setup)
    models = {m.id: m for m in c.models.list()}
    assert set(models) == {BASE, "mod"}
    assert models["mod"].parent == BASE and models["mod"].version == 1 and models[BASE].parent is None
    a = c.completions.create(model=BASE, prompt="Hello there", max_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    b = c.completions.create(model=BASE, prompt="Hello there", max_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 6 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 6
    text = httpx.get(setup["srv"].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("flexc:time_to_first_token_seconds_bucket", "flexc:inter_token_latency_seconds_bucket",
                 "flexc:e2e_request_latency_seconds_bucket", "flexc:num_requests_running",
                 "flexc:num_requests_waiting", "flexc:kv_cache_usage_perc", "flexc:prompt_tokens_total",
                 "flexc:generation_tokens_total", "flexc:slo_attainment"):
        assert name in text, name


def test_streamed_chat_with_usage(setup):
    """A streamed chat with include_usage gives the non-streamed reply's text in chunks of one id, a final chunk
    with choices [] and the usage, usage null before it, and ends with data: [DONE]."""
    c = _client(setup)
    want = c.chat.completions.create(model="mod", messages=QUESTION, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="mod", messages=QUESTION, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == want.choices[0].finish_reason
    with httpx.stream("POST", setup["srv"].url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": BASE, "prompt": "Hi", "max_tokens": 3, "stream": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_string_cuts_streamed_and_whole_replies_alike(setup):
    """A stop string from the middle of a greedy completion ends it there (finish_reason stop), streamed or not;
    the stream never shows text past the cut."""
    c = _client(setup)
    kw = dict(model=BASE, prompt="Hello there", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    k = next(i for i in range(2, len(full) - 1) if full[i:i + 2].isprintable() and not full[i:i + 2].isspace()
             and full.find(full[i:i + 2]) == i)
    whole = c.completions.create(**kw, stop=[full[k:k + 2]]).choices[0]
    streamed = list(c.completions.create(**kw, stop=[full[k:k + 2]], stream=True))
    assert whole.text == full[:k] and whole.finish_reason == "stop"
    assert "".join(ch.choices[0].text for ch in streamed) == full[:k]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(setup):
    """Unknown model 404, malformed JSON 400, a body over the limit 413 (announced or streamed), a missing or
    wrong key 401 (but /health is open), a job on a file that does not exist 400, an adapter path outside the
    allowed directories 403 (also through '..'), n=2 400: each with an OpenAI error body."""
    c = _client(setup)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=QUESTION, stream=True)
    assert _error(e.value.response)["code"] == "model_not_found"
    r = _post(setup, "/v1/chat/completions", content=b'{"model": "chat-model", "messages": [')
    assert r.status_code == 400 and _error(r)["code"] == "invalid_json"
    big = {"model": BASE, "prompt": "x" * 70_000}
    r = _post(setup, "/v1/completions", big)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    chunked = (json.dumps(big).encode()[i:i + 8192] for i in range(0, 80_000, 8192))   # no Content-Length
    r = _post(setup, "/v1/completions", content=chunked)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    r = _post(setup, "/v1/completions", {"model": BASE, "prompt": "hi"}, key=None)
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(setup, key="sk-wrong").models.list()
    assert httpx.get(setup["srv"].url + "/health").status_code == 200
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=BASE, training_file="file-" + "0" * 24)
    assert _error(e.value.response)["param"] == "training_file"
    for path in (setup["dirs"]["outside"], os.path.join(str(setup["root"]), "adapters", "..", "outside")):
        r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code == 403 and _error(r)["code"] == "lora_path_not_allowed", path
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=BASE, prompt="hi", n=2)
    assert _error(e.value.response)["param"] == "n"
    assert "evil" not in {m.id for m in c.models.list()}


def test_adapters_of_other_ranks_load_replace_unload(setup):
    """load_lora_adapter serves a rank-2 adapter on another projection (PEFT's greedy reply) beside the rank-4
    module adapter and the base model in concurrent requests; a second load needs load_inplace (version 2); a
    rank above --max-lora-rank is refused with the reason; unload removes it (then 404)."""
    c = _client(setup)
    d = setup["dirs"]
    r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "side", "lora_path": d["side"]})
    assert r.status_code == 200, r.text
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda m: _chat(c, m), ["side", "mod", BASE]))
    side = _assert_peft_reply(setup, replies[0], d["side"])
    _assert_peft_reply(setup, replies[1], d["mod"])
    assert side != _assert_peft_reply(setup, replies[2], None)          # the rank-2 adapter changes the answer
    r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "side", "lora_path": d["mod"]})
    assert r.status_code == 400 and _error(r)["code"] == "adapter_exists"
    r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "side", "lora_path": d["mod"], "load_inplace": True})
    assert r.status_code == 200
    assert {m.id: m for m in c.models.list()}["side"].version == 2
    _assert_peft_reply(setup, _chat(c, "side"), d["mod"])               # now the module adapter's weights
    r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": d["big"]})
    assert r.status_code == 400 and "rank r=8 is not served" in _error(r)["message"]
    assert _post(setup, "/v1/unload_lora_adapter", {"lora_name": "side"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _chat(c, "side")


def _metric(setup, name):
    text = httpx.get(setup["srv"].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name))


def test_client_that_goes_away_frees_its_request(setup):
    """A streaming client that disconnects after two chunks: the request is aborted (not run to its 400
    tokens) and its KV blocks are freed."""
    aborted = _metric(setup, 'flexc:request_success_total{finished_reason="abort"')
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", setup["srv"].url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(4)]                   # role chunk, blank, first token chunk, blank
    assert got[0].startswith("data: ")
    deadline = time.time() + 30
    while time.time() < deadline:
        if _metric(setup, 'flexc:request_success_total{finished_reason="abort"') == aborted + 1:
            break
        time.sleep(0.1)
    assert _metric(setup, 'flexc:request_success_total{finished_reason="abort"') == aborted + 1
    assert _metric(setup, "flexc:num_requests_running") == 0 and _metric(setup, "flexc:kv_cache_usage_perc") == 0


@pytest.fixture(scope="module")
def job_a(setup):
    """An uploaded chat-format file and a fine-tuning job on it (24 steps, seed 7)."""
    c = _client(setup)
    path = write_chat_jsonl(str(setup["root"] / "train.jsonl"), n=8)
    f = c.files.create(file=open(path, "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="a", seed=7, hyperparameters=HYPER)
    return f, job


def _wait(client, job_id, statuses, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout} s (status {job.status})")


def _final_adapter(setup, job_id) -> str:
    ck = os.path.join(setup["data"], "jobs", job_id, "checkpoints")
    return os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())


def test_fine_tuning_job_serves_live_then_final_adapter(setup, job_a):
    """A job on an uploaded file: its fine_tuned_model answers while it runs (with the current version), it
    succeeds, its events carry step/loss/tokens, its checkpoints are listed, and a chat with its model gives
    the reply PEFT gives with the saved adapter."""
    c = _client(setup)
    f, job = job_a
    assert f.id in {x.id for x in c.files.list()}
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    running = _wait(c, job.id, {"running", "succeeded"})
    name = running.fine_tuned_model
    assert name == f"ft:{BASE}:flexc:a:{job.id[-8:]}"
    live = c.chat.completions.create(model=name, messages=QUESTION, max_tokens=4, temperature=0)
    assert live.system_fingerprint.startswith("v")
    done = _wait(c, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded" and done.fine_tuned_model == name and done.trained_tokens > 0
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=200))
    steps = [e.data for e in events if e.type == "metrics"]
    assert sorted(s["step"] for s in steps) == list(range(1, 25))
    assert all(s["train_loss"] > 0 and s["trained_tokens"] > 0 for s in steps)
    assert {e.message for e in events} >= {"Fine-tuning job started", "The job has successfully completed"}
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [k.step_number for k in ckpts][:2] == [24, 20] and ckpts[0].metrics.train_loss is not None
    models = {m.id: m for m in c.models.list()}
    assert models[name].parent == BASE and models[name].version == 24
    final = _final_adapter(setup, job.id)
    trained = _assert_peft_reply(setup, _chat(c, name), final)
    assert trained != _assert_peft_reply(setup, _chat(c, BASE), None)   # the trained adapter changes the answer


def test_restart_after_sigkill_resumes_the_job(setup, job_a):
    """SIGKILL of the server during a second job (same file, seed and hyperparameters) after a checkpoint; started
    again on the same data directory it still lists the file, the job resumes from that checkpoint, succeeds,
    and its adapter equals the uninterrupted job's (1e-6); the first job's model still answers."""
    c = _client(setup)
    f, first = job_a
    _wait(c, first.id, {"succeeded"})
    job = c.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="b", seed=7, hyperparameters=HYPER)
    latest = os.path.join(setup["data"], "jobs", job.id, "checkpoints", "latest")
    deadline = time.time() + 120
    while not os.path.isfile(latest) and time.time() < deadline:
        time.sleep(0.01)
    setup["srv"].kill()
    killed_at = int(open(latest).read().strip().split("-")[1])
    assert 0 < killed_at < 24, killed_at
    setup["srv"].start()
    c = _client(setup)
    assert f.id in {x.id for x in c.files.list()}
    done = _wait(c, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=500)]
    assert any("resumed from the checkpoint at step" in m for m in messages)
    a = load_file(os.path.join(_final_adapter(setup, first.id), "adapter_model.safetensors"))
    b = load_file(os.path.join(_final_adapter(setup, job.id), "adapter_model.safetensors"))
    assert set(a) == set(b)
    for n in a:
        assert rel_err(b[n], a[n]) < 1e-6, n
    assert _chat(c, c.fine_tuning.jobs.retrieve(first.id).fine_tuned_model)
    assert json.loads(httpx.get(setup["srv"].url + "/health").text) == {}
