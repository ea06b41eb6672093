"""Continuous batching scheduler, driven by hand-built executor outputs (no model)."""
import pytest

from flexc.runtime.batch import ExecutorOutput, SeqKind
from flexc.runtime.scheduler import RequestStatus
from tests.runtime.utils import create_requests, create_scheduler, fake_output, run_to_completion


def test_decodes_first_then_prefill_fcfs_within_budget():
    """A batch holds decode tokens first, then prefill chunks in arrival order, never more than the budget."""
    sched = create_scheduler(token_budget=10)
    a, b, c = create_requests([3, 6, 6], max_new_tokens=5)
    sched.add_request(a)
    out = sched.schedule()
    sched.update_from_output(out, fake_output(out))        # a is prefilled and has its first token
    sched.add_request(b)
    sched.add_request(c)
    out = sched.schedule()
    assert [(s.req_id, s.kind, len(s.token_ids)) for s in out.seqs] == [
        ("r0", SeqKind.DECODE, 1), ("r1", SeqKind.PREFILL, 6), ("r2", SeqKind.PREFILL, 3)]
    assert out.total_num_scheduled_tokens == 10
    assert [s.sample for s in out.seqs] == [True, True, False]


def test_chunked_prefill_samples_only_after_the_last_chunk():
    """A prompt longer than the budget is split over iterations at consecutive positions; only the last chunk samples."""
    sched = create_scheduler(token_budget=4)
    (req,) = create_requests([10], max_new_tokens=2)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        (s,) = out.seqs
        chunks.append((s.num_computed_tokens, s.token_ids, s.sample))
        sched.update_from_output(out, fake_output(out))
    assert chunks == [(0, list(range(10, 14)), False), (4, list(range(14, 18)), False), (8, [18, 19], True)]
    assert req.output_token_ids == [7]


def test_admission_limited_by_free_blocks():
    """A waiting request is admitted only when its chunk's KV blocks are free; FCFS, no overtaking."""
    sched = create_scheduler(num_blocks=4, block_size=4, token_budget=64)
    a, b, c = create_requests([12, 8, 1], max_new_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [s.req_id for s in out.seqs] == ["r0"]            # r1 needs 2 blocks, 1 free; r2 must wait behind it
    sched.update_from_output(out, fake_output(out))          # r0 finishes (max_new_tokens=1) and frees its blocks
    out = sched.schedule()
    assert [s.req_id for s in out.seqs] == ["r1", "r2"]
    assert out.finished_req_ids == ["r0"]


def test_preemption_frees_newest_and_recomputes_it():
    """When decodes run out of blocks the newest running request is preempted, requeued first, recomputed over
    prompt + output later, and every request still gets all its tokens."""
    sched = create_scheduler(num_blocks=4, block_size=4, token_budget=64)
    reqs = create_requests([4, 4], max_new_tokens=[8, 8])
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched)
    preempted = [rid for o in outs for rid in o.preempted_req_ids]
    assert preempted and preempted[0] == "r1"
    assert all(len(r.output_token_ids) == 8 and r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert reqs[1].num_preemptions >= 1
    # the first batch after the preemption that runs r1 again recomputes its prompt and generated tokens
    rerun = next(s for o in outs[1:] for s in o.seqs if s.req_id == "r1" and s.num_computed_tokens == 0
                 and len(s.token_ids) > 4)
    assert rerun.token_ids[:4] == list(range(10, 14)) and set(rerun.token_ids[4:]) == {7}
    assert sched.kv.num_free_blocks == 4


def test_preempted_victim_is_unscheduled():
    """A victim already placed in this iteration's batch is taken out again and its tokens are not run."""
    sched = create_scheduler(num_blocks=3, block_size=4, token_budget=64)
    a, b = create_requests([4, 4], max_new_tokens=[6, 6])
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(10):
        out = sched.schedule()
        ids = [s.req_id for s in out.seqs]
        assert not set(ids) & set(out.preempted_req_ids)
        assert len(ids) == len(set(ids))
        sched.update_from_output(out, fake_output(out))
        if not sched.has_unfinished_requests():
            break


def test_stop_token_and_length_finish_and_free_blocks():
    """A stop token or max_new_tokens finishes a request, frees its blocks and is reported to the next batch."""
    sched = create_scheduler()
    a, b = create_requests([3, 3], max_new_tokens=[5, 2], stop_token_ids={9})
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    ups = sched.update_from_output(out, fake_output(out, token=1))
    assert [u.finished for u in ups] == [False, False]
    out = sched.schedule()
    ups = sched.update_from_output(out, ExecutorOutput(sampled_token_ids={"r0": 9, "r1": 1}))
    assert {u.req_id: u.status for u in ups} == {"r0": RequestStatus.FINISHED_STOPPED,
                                                 "r1": RequestStatus.FINISHED_LENGTH}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sorted(sched.schedule().finished_req_ids) == ["r0", "r1"]


def test_request_that_can_never_fit_rejected():
    """A request whose prompt + max_new_tokens exceed the whole cache is a ValueError, not a deadlock."""
    sched = create_scheduler(num_blocks=2, block_size=4)
    (req,) = create_requests([6], max_new_tokens=4)
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        sched.add_request(req)


def test_policy_is_pluggable():
    """The scheduler runs the batch its policy builds: a custom policy that decodes, then admits only the newest
    waiting request per iteration gives exactly those batches, where decode-first FCFS admits all three at once."""
    class NewestOnePerIteration:
        def schedule(self, sched):
            seqs = []
            for req in list(sched.running):
                if sched.next_kind(req) is SeqKind.DECODE:
                    seqs.append(sched.schedule_tokens(req, 1, seqs))
            if sched.waiting:
                seq = sched.admit(sched.waiting[-1], sched.config.token_budget - len(seqs))
                if seq is not None:
                    seqs.append(seq)
            return seqs

    def batches(policy):
        sched = create_scheduler(token_budget=16, policy=policy)
        reqs = create_requests([3, 4, 5], max_new_tokens=3)
        for r in reqs:
            sched.add_request(r)
        outs = run_to_completion(sched)
        assert all(len(r.output_token_ids) == 3 and r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
        assert sched.kv.num_free_blocks == sched.kv.num_blocks
        return [[(s.req_id, s.kind, len(s.token_ids)) for s in o.seqs] for o in outs]

    P, D = SeqKind.PREFILL, SeqKind.DECODE
    assert batches(None)[0] == [("r0", P, 3), ("r1", P, 4), ("r2", P, 5)]
    custom = batches(NewestOnePerIteration())
    assert custom[:3] == [[("r2", P, 5)],
                          [("r2", D, 1), ("r1", P, 4)],
                          [("r2", D, 1), ("r1", D, 1), ("r0", P, 3)]]
    assert custom[3:] == [[("r1", D, 1), ("r0", D, 1)], [("r0", D, 1)]]
