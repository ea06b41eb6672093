"""Runtime test helpers: a tiny paged cache and a one-batch forward driver (no scheduler); schedulers without a
model (as vLLM's tests/v1/core/utils.py) and saved tiny models for the engine tests."""
import os
from typing import Optional

import torch

from flexc.kernels.attention import PagedAttentionContext, paged_context
from flexc.runtime.batch import ExecutorOutput, SchedulerOutput
from flexc.runtime.kv_cache import KVCacheManager
from flexc.runtime.scheduler import Request, Scheduler, SchedulerConfig
from tests.utils import write_config

BLOCK = 4


class TinyCache:
    """A tiny paged cache: each sequence gets its own contiguous-but-shuffled block list."""

    def __init__(self, runner, num_blocks=64):
        cfg = runner.compiled.graph.model
        shape = (num_blocks, BLOCK, cfg["num_kv_heads"], cfg["head_dim"])
        self.k = [torch.zeros(shape) for _ in runner.layers]
        self.v = [torch.zeros(shape) for _ in runner.layers]
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables = {}
        self._free = perm

    def table(self, sid, upto):
        t = self.tables.setdefault(sid, [])
        while len(t) * BLOCK < upto:
            t.append(self._free.pop())
        return t


def run_batch(runner, cache, chunks):
    """chunks: list of (sid, ids, positions, FinetuneSequence or None). Runs one flat batch forward."""
    ids = torch.tensor([i for _, c, _, _ in chunks for i in c])
    pos = torch.tensor([p for _, _, ps, _ in chunks for p in ps])
    lens = [len(c) for _, c, _, _ in chunks]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    tables = [cache.table(sid, ps[-1] + 1) for sid, _, ps, _ in chunks]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    ctx_lens = torch.tensor([ps[0] for _, _, ps, _ in chunks], dtype=torch.int32)
    slots = torch.tensor([tables[j][p // BLOCK] * BLOCK + p % BLOCK for j, (_, _, ps, _) in enumerate(chunks)
                          for p in ps], dtype=torch.int64)
    ctx = PagedAttentionContext(k_caches=cache.k, v_caches=cache.v, block_tables=bt, context_lens=ctx_lens,
                                slot_mapping=slots)
    with paged_context(ctx):
        h, cos, sin = runner.embed_forward(ids, pos)
        h, saved = runner.layers_forward(h, cos, sin, cu, keep_saved=True, on_layer=lambda i: setattr(ctx, "layer", i))
    for j, (_, _, ps, fs) in enumerate(chunks):
        if fs is None:
            continue
        rows = (int(cu[j]), int(cu[j + 1]))
        for layer, s in enumerate(saved):
            fs.record_layer(layer, s, rows, ps[0])
        fs.record_output(h, rows, ps[0])
    return h


def drive_finetune_only(runner, job, chunk=8, window=2):
    """Run a FinetuneJob to the end alone: chunked forward batches, then backward windows."""
    cache = TinyCache(runner, num_blocks=256)
    while True:
        fs = job.next_sequence()
        if fs is None:
            return
        while fs.forward_remaining:
            start, ids, pos = fs.next_chunk(chunk)
            run_batch(runner, cache, [(fs.seq_id, ids, pos, fs)])
        while not fs.done:
            job.on_window(fs.backward_window(runner, window))
        cache.tables.pop(fs.seq_id, None)
        cache._free = list(range(256))


# ---------------------------------------------------------------- scheduler / engine builders


def create_scheduler(num_blocks: int = 64, block_size: int = 4, token_budget: int = 16, max_model_len: int = 256,
                     policy=None) -> Scheduler:
    cfg = SchedulerConfig(token_budget=token_budget, max_model_len=max_model_len)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), policy)


def create_requests(prompt_lens, max_new_tokens=4, stop_token_ids=frozenset(), prefix: str = "r") -> list[Request]:
    news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompt_lens)
    return [Request(req_id=f"{prefix}{i}", prompt_token_ids=list(range(10, 10 + n)), max_new_tokens=m,
                    stop_token_ids=frozenset(stop_token_ids)) for i, (n, m) in enumerate(zip(prompt_lens, news))]


def fake_output(out: SchedulerOutput, token: int = 7) -> ExecutorOutput:
    """What an executor would return: ``token`` for every sampling sequence."""
    return ExecutorOutput(sampled_token_ids={s.req_id: token for s in out.seqs if s.sample},
                          num_tokens=out.total_num_scheduled_tokens)


def run_to_completion(sched: Scheduler, max_steps: int = 1000, token: int = 7) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        out = sched.schedule()
        outs.append(out)
        sched.update_from_output(out, fake_output(out, token))
    raise AssertionError("scheduler did not finish")


def save_tiny_model(dirpath, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """A tiny random HF model directory (config + safetensors) both flexc and transformers load."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import json
    cfg_path = write_config(dirpath, arch, **overrides)
    with open(cfg_path) as f:
        raw = json.load(f)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw), dtype=torch.float32)
    out = os.path.join(str(dirpath), f"{arch}-model")
    model.save_pretrained(out)
    return out


def save_tiny_adapter(model_dir: str, out_dir: str, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj"),
                      alpha: float = 8) -> str:
    """A PEFT adapter directory for the model in ``model_dir`` with random (non-zero) lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tests.utils import randomize_lora
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    randomize_lora(peft, seed=seed, std=0.2)
    peft.save_pretrained(out_dir)
    return out_dir


def save_base_weights(model, path) -> str:
    """The base weights in Hugging Face layout (model.safetensors), as a checkpoint directory holds them."""
    from safetensors.torch import save_file
    state = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p.detach().contiguous()
             for n, p in model.named_parameters() if "lora_" not in n}
    save_file(state, os.path.join(str(path), "model.safetensors"))
    return str(path)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: Optional[int] = None) -> list[int]:
    """transformers generate(do_sample=False) on one unpadded prompt; the new tokens."""
    kw = {} if eos is None else {"eos_token_id": eos}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()
