"""Token-level finetuning: chunked forward in mixed batches + windowed backward = full-sequence gradients."""
import pytest
import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.dataset import TrainingSequence
from tests.runtime.utils import TinyServing
from tests.utils import randomize_lora, rel_err, write_config

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    src = resolve_model(write_config(tmp_path_factory.mktemp("cfg"), "llama"))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, seq_len=16)
    model = load_model(src, spec, "fp32", seed=2)
    randomize_lora(model)
    return cm, model


def test_chunked_mixed_windowed_equals_peft(setup):
    """A 23-token sequence in 3 chunks, each batched with other requests' prefill/decode tokens, and its
    backward in windows of 2 layers, gives PEFT's loss.backward() gradients (1e-4 relative)."""
    cm, model = setup
    serving = TinyServing(cm, model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (23,), generator=g).tolist()
    labels = ids[1:] + [-100]
    labels[:5] = [-100] * 5                                      # prompt part without loss
    seq = TrainingSequence(tuple(ids), tuple(labels))
    n_loss = seq.num_loss_tokens
    fs = serving.sequence(seq, loss_scale=1.0 / n_loss, seq_id="ft")
    other = torch.randint(0, 256, (30,), generator=g).tolist()
    plan = [(9, [(0, 6)]), (8, [(6, 13)]), (6, [(13, 14), (14, 15)])]   # ft chunk size, other request chunks
    for n, others in plan:
        start, cids, cpos = fs.next_chunk(n)
        chunks = [("inf", other[a:b], list(range(a, b)), None) for a, b in others[:1]]
        chunks.insert(1 if start else 0, ("ft", cids, cpos, fs))
        serving.run(chunks)
    assert fs.in_backward
    grads, loss = {}, None
    while not fs.done:
        res = fs.backward_window(serving.runner, 2)
        assert len(res.layers) <= 2
        loss = res.loss_sum if res.loss_sum is not None else loss
        for k, v in res.grads.items():
            grads[k] = grads.get(k, 0) + v
    # reference: PEFT with HF attention on the whole sequence, mean loss over the labelled tokens
    model.get_base_model().set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    out = model(input_ids=torch.tensor([ids]))
    ref_loss = torch.nn.functional.cross_entropy(out.logits[0], torch.tensor(labels), ignore_index=-100,
                                                 reduction="sum")
    (ref_loss / n_loss).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.get_base_model().set_attn_implementation("flexc")
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert set(grads) == set(ref)
    for k in ref:
        assert rel_err(grads[k], ref[k]) < 1e-4, k
    model.zero_grad(set_to_none=True)


def test_store_holds_only_token_rows(setup):
    """The store keeps one buffer per distinct saved token tensor, sized by the sequence length."""
    cm, model = setup
    serving = TinyServing(cm, model)
    seq = TrainingSequence(tuple(range(1, 11)), tuple(range(2, 11)) + (-100,))
    fs = serving.sequence(seq, 0.1)
    _, cids, cpos = fs.next_chunk(10)
    serving.run([("ft", cids, cpos, fs)])
    per_layer = fs.store.nbytes() / 3
    fs2 = serving.sequence(TrainingSequence(tuple(range(1, 21)), tuple(range(2, 21)) + (-100,)), 0.1, "ft2")
    _, cids, cpos = fs2.next_chunk(20)
    serving.run([("ft2", cids, cpos, fs2)])
    assert fs2.store.nbytes() == 2 * fs.store.nbytes() and per_layer > 0
    with pytest.raises(ValueError, match="forward covered"):
        serving.sequence(seq, 0.1, "ft3").backward_window(serving.runner, 1)
