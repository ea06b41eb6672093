"""Finetuning jobs: SGD/AdamW steps equal PEFT's, PEFT-format adapters, resume, non-finite steps."""
import copy

import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.checkpoint import save_peft_adapter
from flexc.runtime.finetune import FinetuneConfig, FinetuneJob, JobStatus
from tests.runtime.utils import TinyServing, drive_finetune_only, drive_one
from tests.utils import randomize_lora, rel_err, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    src = resolve_model(write_config(tmp_path_factory.mktemp("cfg"), "qwen2"))
    spec = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=4)
    randomize_lora(model)
    return src, spec, cm, model


def _data(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (int(torch.randint(9, 21, (1,), generator=g)),), generator=g).tolist()
        labels = ids[1:] + [-100]
        labels[: i % 3] = [-100] * (i % 3)
        out.append(TrainingSequence(tuple(ids), tuple(labels)))
    return out


def _job(cm, model, data, cfg, job_id="j"):
    """A job training the model's own LoRA tensors, resident in a serving executor (``serving.params``)."""
    serving = TinyServing(cm, model)
    job = FinetuneJob(job_id, data, serving.params, cfg, serving.sequence, peft_config=LoraSpec.to_peft(cm.lora))
    return serving, job


def _peft_reference(model, data, cfg):
    """PEFT trained with ordinary loss.backward() on the same sequences in the same order."""
    model.get_base_model().set_attn_implementation("sdpa")
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = (torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay))
    losses = []
    for step in range(len(data) // cfg.grad_accum):
        opt.zero_grad()
        tot = 0.0
        for s in data[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]:
            out = model(input_ids=torch.tensor([s.input_ids]))
            loss = torch.nn.functional.cross_entropy(out.logits[0], torch.tensor(s.labels), ignore_index=-100)
            (loss / cfg.grad_accum).backward()
            tot += float(loss.detach()) / cfg.grad_accum
        opt.step()
        losses.append(tot)
    model.get_base_model().set_attn_implementation("flexc")
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, losses


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_steps_equal_peft(setup, opt):
    """Chunked forward + windowed backward + accumulation: adapter weights after 3 steps equal PEFT's (1e-4)."""
    _, _, cm, model0 = setup
    data = _data(6)
    cfg = FinetuneConfig(optimizer=opt, lr=0.05 if opt == "sgd" else 0.01, grad_accum=2)
    model = copy.deepcopy(model0)
    runner, job = _job(cm, model, data, cfg)
    drive_finetune_only(runner, job, chunk=7, window=2)
    assert job.status == JobStatus.COMPLETED and job.step == 3 and job.version == 3
    assert f"job {job.status}" == "job completed"          # as the main job's summary prints it
    ours = {n: p.detach().clone() for n, p in runner.params.items()}
    ref_model = copy.deepcopy(model0)
    ref, ref_losses = _peft_reference(ref_model, data, cfg)
    assert job.loss_history == pytest.approx(ref_losses, rel=1e-5)
    for n in ref:
        assert rel_err(ours[n], ref[n]) < 1e-4, n
    start = {n: p for n, p in model0.named_parameters() if "lora_" in n}
    assert any(rel_err(ours[n], start[n]) > 1e-3 for n in ref)        # training moved the weights


def test_saved_adapter_loads_in_peft(setup, tmp_path):
    """An adapter saved in PEFT format loads with PeftModel.from_pretrained and gives the same logits."""
    from peft import PeftModel
    src, spec, cm, model = setup
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    save_peft_adapter(str(tmp_path / "ad"), params, "default", spec.to_peft())
    base = load_model(src, None, "fp32", seed=4)
    base.set_attn_implementation("sdpa")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    ids = torch.tensor([[3, 17, 99, 5, 42]])
    model.get_base_model().set_attn_implementation("sdpa")
    with torch.no_grad():
        a = loaded(input_ids=ids).logits
        b = model(input_ids=ids).logits
    model.get_base_model().set_attn_implementation("flexc")
    assert rel_err(a, b) < 1e-6


def test_resume_gives_same_adapter(setup, tmp_path):
    """A job abandoned after 2 of 4 steps and resumed from its checkpoint ends with the uninterrupted adapter."""
    _, _, cm, model0 = setup
    data = _data(4, seed=3)
    base = dict(optimizer="adamw", lr=0.01, grad_accum=1, shuffle=True, seed=5, epochs=2, steps=4)
    m_full = copy.deepcopy(model0)
    runner, job = _job(cm, m_full, data, FinetuneConfig(**base))
    drive_finetune_only(runner, job)
    full = {n: p.detach().clone() for n, p in runner.params.items()}

    ck = str(tmp_path / "ck")
    m_a = copy.deepcopy(model0)
    runner, job = _job(cm, m_a, data, FinetuneConfig(**base, checkpoint_dir=ck, checkpoint_every=1))
    while job.step < 2:                          # run until 2 steps, then drop everything (the "kill")
        fs = job.next_sequence()
        drive_one(runner, job, fs)
    del job, runner
    m_b = copy.deepcopy(model0)                   # a fresh process would start from the base weights again
    runner, job = _job(cm, m_b, data, FinetuneConfig(**base, checkpoint_dir=ck, checkpoint_every=1))
    assert job.step == 2
    drive_finetune_only(runner, job)
    assert job.step == 4
    for n, t in full.items():
        assert torch.equal(runner.params[n].detach(), t), n


def test_nonfinite_steps_skipped_then_fail(setup):
    """A NaN gradient skips its step (weights untouched, recorded); max_nonfinite in a row fail the job."""
    _, _, cm, model0 = setup
    model = copy.deepcopy(model0)
    data = _data(4, seed=1)
    runner = TinyServing(cm, model)
    bad = {1, 2, 3}

    def make(s, scale, sid):
        pos = int(sid.split("/")[1])
        return runner.sequence(s, float("nan") if pos in bad else scale, sid)
    params = runner.params
    job = FinetuneJob("nan", data, params, FinetuneConfig(optimizer="sgd", lr=0.1, max_nonfinite=2, epochs=1), make)
    fs = job.next_sequence()
    drive_one(runner, job, fs)
    after_good = {n: p.detach().clone() for n, p in params.items()}
    drive_one(runner, job, job.next_sequence())
    assert job.skipped_steps == [1] and job.status == JobStatus.RUNNING
    assert all(torch.equal(params[n], after_good[n]) for n in params)
    drive_one(runner, job, job.next_sequence())
    assert job.status == JobStatus.FAILED and "2 non-finite steps in a row" in job.error
    assert job.next_sequence() is None


@pytest.mark.parametrize("kw,msg", [(dict(optimizer="lion"), "unknown optimizer 'lion'"), (dict(lr=0), "lr must"),
                                    (dict(grad_accum=0), "grad_accum must"), (dict(schedule="step"), "schedule")])
def test_bad_config(kw, msg):
    """Bad finetuning options are ValueErrors naming the value and what is allowed."""
    with pytest.raises(ValueError, match=msg):
        FinetuneConfig(**kw)


_CHILD = r"""
import copy, sys, time
sys.path.insert(0, {root!r})
import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.finetune import FinetuneConfig
from tests.runtime.test_finetune import _data, _job, drive_one
from tests.utils import randomize_lora
src = resolve_model({cfg!r})
spec = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
cm = flexc.compile(src, lora=spec, seq_len=16)
model = load_model(src, spec, "fp32", seed=4)
randomize_lora(model)
runner, job = _job(cm, model, _data(4, seed=3), FinetuneConfig(**{base!r}, checkpoint_dir={ck!r}, checkpoint_every=1))
while True:
    fs = job.next_sequence()
    if fs is None:
        break
    drive_one(runner, job, fs)
    time.sleep(1.0)            # slow enough for the parent to kill it between checkpoints
"""


def test_resume_after_kill(setup, tmp_path):
    """A training process killed with SIGKILL after its 2nd checkpoint resumes to the uninterrupted adapter."""
    import os
    import signal
    import subprocess
    import sys
    import time
    src, spec, cm, model0 = setup
    base = dict(optimizer="adamw", lr=0.01, grad_accum=1, shuffle=True, seed=5, epochs=2, steps=4)
    m_full = copy.deepcopy(model0)
    runner, job = _job(cm, m_full, _data(4, seed=3), FinetuneConfig(**base))
    drive_finetune_only(runner, job)
    full = {n: p.detach().clone() for n, p in runner.params.items()}

    ck = str(tmp_path / "ck")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _CHILD.format(root=root, cfg=str(src.path), base=base, ck=ck)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root)
    latest = os.path.join(ck, "latest")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(latest) and open(latest).read().strip() == "step-000002":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the training process ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    m_b = copy.deepcopy(model0)
    runner, job = _job(cm, m_b, _data(4, seed=3), FinetuneConfig(**base, checkpoint_dir=ck, checkpoint_every=1))
    assert job.step == 2
    drive_finetune_only(runner, job)
    for n, t in full.items():
        assert torch.equal(runner.params[n].detach(), t), n
