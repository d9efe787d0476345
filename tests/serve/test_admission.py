"""The admission gate in front of `@serve.batch`: requests wait while every batch slot is busy
and pass together, a full batch per freed slot, first come first served (no Ray needed)."""

import asyncio

import numpy as np
import pytest
from diffsparse.serve.admission import AdmissionGate
from diffsparse.serve.batches import Job


def _job(samples: int = 1) -> Job:
    return Job(conditioning={"class_labels": np.zeros(samples, np.int64)}, seed=0, guidance_scale=None, samples=samples)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_wait_while_the_slot_is_busy_and_pass_a_full_batch_at_a_time():
    async def scenario():
        gate = AdmissionGate(slots=1, max_samples=4)
        first = _job()
        await gate.enter(first)                  # a free slot: passes at once
        gate.started([first])                    # its batch runs
        jobs = [_job() for _ in range(10)]
        passed = []

        async def request(job):
            await gate.enter(job)
            passed.append(job)

        tasks = [asyncio.create_task(request(j)) for j in jobs]
        await _settle()
        assert passed == [] and gate.waiting == 10   # held while the only slot is busy
        gate.finished()
        await _settle()
        assert passed == jobs[:4] and gate.released_samples == 4   # one full batch, in arrival order
        gate.started(jobs[:4])
        await _settle()
        assert len(passed) == 4                  # the slot is busy again
        gate.finished()
        await _settle()
        assert passed == jobs[:8]
        gate.started(jobs[4:8])
        gate.finished()
        await _settle()
        assert passed == jobs and gate.waiting == 0
        await asyncio.gather(*tasks)
    asyncio.run(scenario())


def test_two_slots_admit_two_batches_and_multi_sample_jobs_count_their_samples():
    async def scenario():
        gate = AdmissionGate(slots=2, max_samples=4)
        big, small = _job(3), _job(2)
        await gate.enter(big)
        await gate.enter(small)                  # 5 samples fit in two free slots of 4
        gate.started([big])
        gate.started([small])
        waiting = asyncio.create_task(gate.enter(_job(1)))
        await _settle()
        assert not waiting.done()
        gate.finished()
        await _settle()
        assert waiting.done()
    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_an_unstarted_job_gives_its_share_back():
    async def scenario():
        gate = AdmissionGate(slots=1, max_samples=2)
        a, b, c = _job(2), _job(1), _job(1)
        await gate.enter(a)                      # fills the batch being gathered
        tb = asyncio.create_task(gate.enter(b))
        tc = asyncio.create_task(gate.enter(c))
        await _settle()
        assert gate.waiting == 2
        tb.cancel()                              # its client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await tb
        assert gate.waiting == 1
        gate.leave(a)                            # a never ran (its request failed): its share is free again
        await _settle()
        assert tc.done() and gate.released_samples == 1
        gate.leave(a)                            # idempotent
        gate.started([c])
        gate.leave(c)                            # a no-op once its batch started
        assert gate.running == 1 and gate.released_samples == 0
    asyncio.run(scenario())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="slots and max_samples"):
        AdmissionGate(slots=0, max_samples=4)
