"""Runtime test helpers: a serving executor over a tiny model (no scheduler); schedulers without a model (as
vLLM's tests/v1/core/utils.py) and saved tiny models for the engine tests."""
import os
from typing import Optional

import torch

from flexc.runtime.adapters import AdapterRegistry
from flexc.runtime.batch import ExecutorOutput, ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.executor import Executor, make_kv_spec
from flexc.runtime.kv_cache import KVCacheManager
from flexc.runtime.regions import RegionRunner
from flexc.runtime.scheduler import Request, Scheduler, SchedulerConfig
from flexc.runtime.sequence import FinetuneSequence, make_layouts
from tests.utils import write_config

BLOCK = 4
OWN = "own"
"""The adapter name under which a model's own LoRA tensors are resident."""


class TinyServing:
    """The serving executor of a compiled model, with the model's own LoRA tensors resident as adapter ``own``.

    ``params`` are that adapter's live tensors by model parameter name: what the serving graphs read, what a
    finetuning job trains and what a sequence's backward differentiates through.
    """

    def __init__(self, cm, model, num_blocks: int = 256, block_size: int = BLOCK):
        self.runner = RegionRunner(cm, model)
        self.kv = KVCacheManager(num_blocks, block_size)
        self.adapters = AdapterRegistry(cm.lora, model, max_adapters=1)
        self.adapters.load_tensors(OWN, {n: p.detach() for n, p in model.named_parameters() if "lora_" in n})
        self.params = self.adapters.get(OWN).weights
        dtype = next(model.parameters()).dtype
        self.executor = Executor(cm, model, kv_spec=make_kv_spec(cm, dtype, block_size), num_blocks=num_blocks,
                                 adapters=self.adapters, runner=self.runner)
        self.layouts = make_layouts(self.runner)

    def sequence(self, seq, loss_scale: float, seq_id: str = "ft") -> FinetuneSequence:
        """A finetuning sequence that trains ``own``."""
        return FinetuneSequence(seq, self.layouts, loss_scale, seq_id, adapter=self.params)

    def run(self, chunks) -> None:
        """One iteration over ``chunks``: (id, token ids, positions, FinetuneSequence or None); inference chunks
        run with ``own`` too and sample (their tokens are not fed back)."""
        seqs, ft = [], {}
        for sid, ids, pos, fs in chunks:
            assert self.kv.allocate_slots(sid, pos[-1] + 1) is not None
            kind = SeqKind.FINETUNE if fs is not None else SeqKind.PREFILL
            seqs.append(ScheduledSequence(req_id=sid, kind=kind, adapter_id=OWN, token_ids=list(ids),
                                          num_computed_tokens=pos[0], block_ids=list(self.kv.get_block_ids(sid)),
                                          sample=fs is None))
            if fs is not None:
                ft[sid] = fs
        batch = SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                                total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs))
        self.executor.execute(batch, ft)

    def release(self, sid: str) -> None:
        self.kv.free(sid)


def drive_finetune_only(serving: TinyServing, job, chunk=8, window=2):
    """Run a FinetuneJob to the end alone: chunked forward batches, then backward windows."""
    while True:
        fs = job.next_sequence()
        if fs is None:
            return
        drive_one(serving, job, fs, chunk, window)


def drive_one(serving: TinyServing, job, fs, chunk=8, window=3):
    """One sequence of a job: its chunks, then its backward windows (gradients to the job)."""
    while fs.forward_remaining:
        _, ids, pos = fs.next_chunk(chunk)
        serving.run([(fs.seq_id, ids, pos, fs)])
    serving.release(fs.seq_id)
    while not fs.done:
        job.on_window(fs.backward_window(serving.runner, window))


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
