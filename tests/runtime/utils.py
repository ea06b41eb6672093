"""Runtime test helpers: a tiny paged cache and a one-batch forward driver (no scheduler)."""
import torch

from flexc.kernels.attention import PagedAttentionContext, paged_context

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
