"""The roofline cost model reproduces its inputs: decode and prefill of llama-3.1-8b built by hand from the
published shapes (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256) equal the model's."""
import pytest

import flexc
from flexc.runtime.latency import IterationWork
from flexc.runtime.simulator.cost import IterationDetail, RooflineCost, kv_capacity
from flexc.runtime.simulator.hardware import BUILTIN_GPUS

H, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 4096, 32, 32, 8, 14336, 128256
HEAD_DIM = H // HEADS
BF16 = 2
LINEARS = [(H, H), (H, KV_HEADS * HEAD_DIM), (H, KV_HEADS * HEAD_DIM), (H, H), (H, INTER), (H, INTER), (INTER, H)]
"""q, k, v, o, gate, up, down: (in, out) features."""
GPU = BUILTIN_GPUS["a100-80gb"]


@pytest.fixture(scope="module")
def cost():
    compiled = flexc.compile("llama-3.1-8b", lora=None, builtin_passes=())      # shape only, no weights
    return compiled, RooflineCost(compiled, GPU)


def _matmul(tokens, n_in, n_out):
    """FLOPs and bytes (bf16 weight, input and output) of one [tokens, n_in] x [n_in, n_out] matmul."""
    return 2 * tokens * n_in * n_out, BF16 * (n_in * n_out + tokens * n_in + tokens * n_out)


def _seconds(flops, nbytes):
    return max(flops / GPU.compute_rate, nbytes / GPU.memory_rate) + GPU.kernel_overhead


def _by_hand(tokens, pairs, kv_tokens, sampled):
    """Per iteration: the layers' matmuls, attention, and the lm_head, as the roofline prices each kernel."""
    flops = nbytes = layer_s = 0.0
    for n_in, n_out in LINEARS:
        f, b = _matmul(tokens, n_in, n_out)
        flops, nbytes, layer_s = flops + f, nbytes + b, layer_s + _seconds(f, b)
    pair_flops = 4 * HEADS * HEAD_DIM                         # QK^T and PV per (query, key) pair and head
    kv_bytes = 2 * KV_HEADS * HEAD_DIM * BF16                 # K and V of one context token in one layer
    qo_bytes = 2 * HEADS * HEAD_DIM * BF16                    # a new token's query and output
    attention_s = _seconds(pair_flops * pairs, kv_bytes * kv_tokens + qo_bytes * tokens)
    lm_head_s = _seconds(*_matmul(sampled, H, VOCAB))
    return dict(flops=flops, nbytes=nbytes, layers=LAYERS * layer_s, attention=LAYERS * attention_s,
                lm_head=lm_head_s)


CASES = {
    # 16 requests decoding with 1,000 tokens of context each: weights and K/V read, memory-bound
    "decode": (IterationWork(decode_tokens=16), IterationDetail(decode_context_tokens=16 * 1001, sampled_tokens=16),
               (16, 16 * 1001, 16 * 1001, 16)),
    # one 4,096-token prompt in one chunk: compute-bound
    "prefill": (IterationWork(prefill_tokens=4096, attention_pairs=4096 * 4096),
                IterationDetail(chunk_context_tokens=4096, sampled_tokens=1), (4096, 4096 * 4096, 4096, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_and_prefill_by_hand(cost, case):
    """Matmul FLOPs and bytes from the graphs equal the shapes' exactly; their seconds, attention and the lm_head
    equal the hand-built roofline; the rest (fused norms, rotary, activations, residuals, the embedding) adds
    under 10%."""
    _, model = cost
    work, detail, (tokens, pairs, kv_tokens, sampled) = CASES[case]
    hand = _by_hand(tokens, pairs, kv_tokens, sampled)
    layer = model.templates[0]
    assert model.templates[0].count == LAYERS and len(model.templates) == 1
    flops, nbytes = layer.forward.totals(tokens, "matmul")
    assert flops == pytest.approx(hand["flops"], rel=1e-12)
    assert nbytes == pytest.approx(hand["nbytes"], rel=1e-12)
    kinds = layer.forward.seconds_by_kind(tokens, GPU.compute_rate, GPU.memory_rate, GPU.kernel_overhead)
    assert LAYERS * kinds["matmul"] == pytest.approx(hand["layers"], rel=1e-9)
    parts = model.components(work, detail)
    assert parts["attention"] == pytest.approx(hand["attention"], rel=1e-9)
    lm = model.logits.seconds_by_kind(sampled, GPU.compute_rate, GPU.memory_rate, GPU.kernel_overhead)
    assert lm["matmul"] == pytest.approx(hand["lm_head"], rel=1e-9)
    total = model.seconds(work, detail)
    by_hand = hand["layers"] + hand["attention"] + hand["lm_head"]
    assert by_hand < total < 1.10 * by_hand


def test_decode_is_memory_bound_and_prefill_compute_bound(cost):
    """The regimes come out right: a decode iteration takes about the weight bytes over the bandwidth, a 4K
    prefill about its FLOPs over the achieved FLOP/s."""
    _, model = cost
    weights = LAYERS * sum(i * o for i, o in LINEARS) * BF16 + H * VOCAB * BF16
    w, d, _ = CASES["decode"]
    assert model.seconds(w, d) > weights / GPU.memory_rate
    w, d, _ = CASES["prefill"]
    assert model.seconds(w, d) > LAYERS * sum(2 * 4096 * i * o for i, o in LINEARS) / GPU.compute_rate


def test_kv_capacity_from_the_plan(cost):
    """Without a memory plan the cache gets what the weights leave of the usable memory."""
    compiled, _ = cost
    kv = kv_capacity(compiled, GPU)
    per_token = 2 * LAYERS * KV_HEADS * HEAD_DIM * BF16
    params = compiled.graph.model["parameters"]
    assert kv == int((GPU.memory_bytes * GPU.memory_utilization - params * BF16) // per_token)
    with pytest.raises(ValueError, match="raise tp"):
        kv_capacity(compiled, BUILTIN_GPUS["a100-80gb"].__class__(
            name="tiny", peak_flops=1e12, memory_bandwidth=1e11, interconnect_bandwidth=1e10, memory_bytes=8e9))


def test_tensor_parallel_collectives_by_hand(tmp_path):
    """At tp=2 a Megatron layer sends two all-reduces of its [T, hidden] output per forward (ring: 2(tp-1)/tp of
    the tensor each), and each rank computes half of every base matmul and of the LoRA A of down_proj (sharded on
    its input) but all of its LoRA B (replicated)."""
    from flexc.ir.spec import LoraSpec
    from tests.utils import TINY, write_config
    c = TINY["llama"]
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    r, fp32, tp, tokens = 4, 4, 2, 100
    lora = LoraSpec(r=r, alpha=8, targets=("down_proj",))
    compiled = flexc.compile(write_config(tmp_path, "llama"), lora=lora, seq_len=16, tp=tp,
                             builtin_passes=("parallelize",))
    layer = RooflineCost(compiled, GPU, tp).templates[0]
    assert len(layer.forward_comm.nbytes) == 2
    sent = float((layer.forward_comm.nbytes @ [1, tokens, tokens ** 2]).sum())
    assert sent == pytest.approx(2 * 2 * (tp - 1) / tp * tokens * hidden * fp32)
    base = sum(i * o for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter),
                                  (hidden, inter), (inter, hidden)])
    want = 2 * tokens * (base / tp + inter * r / tp + r * hidden)
    flops, _ = layer.forward.totals(tokens, "matmul")
    assert flops == pytest.approx(want, rel=1e-12)
