"""Packing requests into static batches (no Ray): admitted requests come out exactly as
`Pipeline.generate` makes them alone, whatever they were packed with."""

import threading

import numpy as np
import pytest
from diffsparse.runtime import Pipeline

from diffsparse.serve.batches import BatchRunner, job_samples
from diffsparse.serve.schema import GenerateRequest, RequestError


@pytest.fixture(scope="module")
def pipe(tiny_bundles):
    return Pipeline.from_bundle(tiny_bundles["toca"])   # batch size 2, guidance on, default scale 4.0


def test_packed_requests_match_pipeline_generate_bit_for_bit(pipe):
    runner = BatchRunner(pipe, max_samples=8)
    requests = [GenerateRequest(class_labels=[3], seed=11), GenerateRequest(class_labels=[1, 2, 9], seed=5),
                GenerateRequest(class_labels=[7], seed=11, guidance_scale=2.0),
                GenerateRequest(class_labels=[0, 4], seed=0, guidance_scale=4.0)]   # the default scale, said aloud
    jobs = [runner.admit(r) for r in requests]
    assert [j.samples for j in jobs] == [1, 3, 1, 2] and job_samples(jobs) == 7
    assert [j.guidance_scale for j in jobs] == [4.0, 4.0, 2.0, 4.0]
    outcomes = runner.run(jobs)
    for r, o in zip(requests, outcomes):
        assert o.error is None
        alone = pipe.generate(r.class_labels, seed=r.seed, guidance_scale=r.guidance_scale)
        np.testing.assert_array_equal(o.generated.samples, alone.samples)
        np.testing.assert_array_equal(o.generated.class_labels, r.class_labels)
        assert (o.generated.seed, o.generated.guidance_scale) == (r.seed, alone.guidance_scale)
    # scale 4.0: 6 samples in 3 static batches of 2; scale 2.0: 1 sample padded to 2
    stats = outcomes[0].batch
    assert (stats.requests, stats.samples, stats.static_batches, stats.padded) == (4, 7, 4, 1)
    assert all(o.batch == stats for o in outcomes)
    assert runner.run(jobs[:1])[0].batch.number == stats.number + 1


def test_admit_refuses_what_generate_would_refuse_and_oversize_requests(pipe):
    runner = BatchRunner(pipe, max_samples=3)
    with pytest.raises(RequestError, match=r"asks for 4 samples; this server takes at most 3 per request") as e:
        runner.admit(GenerateRequest(class_labels=[1, 2, 3, 4]))
    assert e.value.status == 400
    cases = [(GenerateRequest(class_labels=[1, 12]), r"class labels must be in \[0, 9\]"),
             (GenerateRequest(class_labels=[1.5]), "class labels must be whole numbers"),
             (GenerateRequest(class_labels=[]), "empty"),
             (GenerateRequest(conditioning={"class_labels": np.array([[1, 2]])}), "must have shape"),
             (GenerateRequest(conditioning={"prompt_embeds": np.zeros((1, 4))}), "not an input of this model"),
             (GenerateRequest(conditioning={"class_labels": np.array([1.0, np.nan])}), "NaN or infinite")]
    for request, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            runner.admit(request)
        assert e.value.status == 400


def test_a_guidance_scale_is_refused_for_a_bundle_without_guidance(tiny_bundles):
    pipe = Pipeline.from_bundle(tiny_bundles["toca"], verify=False)
    pipe.spec.guidance = False   # only admit runs: it reads the flag, nothing is generated
    runner = BatchRunner(pipe, max_samples=2)
    with pytest.raises(RequestError, match="without classifier-free guidance"):
        runner.admit(GenerateRequest(class_labels=[1], guidance_scale=3.0))
    assert runner.admit(GenerateRequest(class_labels=[1])).guidance_scale is None


def test_a_failing_group_fails_only_its_own_requests(pipe):
    runner = BatchRunner(pipe, max_samples=4)
    good = runner.admit(GenerateRequest(class_labels=[1, 2], seed=3))
    bad = runner.admit(GenerateRequest(class_labels=[5], seed=3, guidance_scale=1e38))   # overflows to NaN
    outcomes = runner.run([bad, good])
    assert outcomes[0].generated is None and "NonFiniteOutputError" in outcomes[0].error
    np.testing.assert_array_equal(outcomes[1].generated.samples, pipe.generate([1, 2], seed=3).samples)
    assert runner.busy == 0 and runner.longest_running() == 0.0


def test_a_running_batch_is_seen_by_the_health_check(pipe):
    runner = BatchRunner(pipe, max_samples=2)
    job = runner.admit(GenerateRequest(class_labels=[1]))
    entered, release = threading.Event(), threading.Event()
    generate = pipe.generate

    def slow(*args, **kwargs):
        entered.set()
        release.wait(30)
        return generate(*args, **kwargs)

    pipe.generate = slow
    try:
        worker = threading.Thread(target=runner.run, args=([job],))
        worker.start()
        assert entered.wait(30)
        assert runner.busy == 1 and runner.longest_running() > 0
        release.set()
        worker.join(30)
    finally:
        del pipe.generate
    assert runner.busy == 0 and runner.longest_running() == 0.0
