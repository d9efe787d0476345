"""ServeConfig: defaults, resources a replica asks Ray for, checks, and `serve run key=value` args."""

from pathlib import Path

import pytest

from diffsparse.serve.config import ServeConfig


def test_defaults_and_derived_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ServeConfig(bundle="b")
    assert c.bundle == str(tmp_path / "b") and Path(c.bundle).is_absolute()   # replicas start in other folders
    assert (c.replicas, c.max_batch, c.threads, c.concurrency, c.device) == (1, None, 1, 1, "cpu")
    assert c.batch_samples(10) == 10 and ServeConfig(bundle="b", max_batch=20).batch_samples(10) == 20
    assert c.ongoing_requests(10) == 20 and ServeConfig(bundle="b", concurrency=2).ongoing_requests(4) == 16
    assert ServeConfig(bundle="b", max_ongoing_requests=3).ongoing_requests(10) == 3
    assert c.max_body_bytes == 64 << 20


def test_a_replica_asks_for_a_gpu_on_cuda_and_its_threads_on_the_cpu():
    assert ServeConfig(bundle="b", threads=3).ray_actor_options() == {"num_cpus": 3, "num_gpus": 0}
    assert ServeConfig(bundle="b", device="cuda", threads=3).ray_actor_options() == {"num_cpus": 1, "num_gpus": 1}


@pytest.mark.parametrize("options, message", [
    ({"replicas": 0}, r"replicas \(--replicas\) must be a whole number of at least 1, got 0"),
    ({"max_batch": 0}, r"max_batch \(--max-batch\)"),
    ({"threads": 1.5}, r"threads \(--threads\)"),
    ({"concurrency": True}, r"concurrency \(--concurrency\)"),
    ({"batch_wait_ms": -1}, "batch_wait_ms must be a finite number >= 0"),
    ({"max_body_mb": 0}, "max_body_mb must be a finite number > 0"),
    ({"stuck_batch_s": float("nan")}, "stuck_batch_s must be a finite number"),
    ({"max_queued_requests": 0}, "max_queued_requests must be -1"),
    ({"backend": "tensorflow"}, "backend must be one of"),
    ({"device": "auto"}, r"device must be one of \['cpu', 'cuda'\]"),
    ({"device": "cuda", "concurrency": 2}, "concurrency > 1 is not yet supported on CUDA"),
    ({"name": "a#b"}, "name must be"),
])
def test_bad_settings_are_refused_naming_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(bundle="b", **options)


def test_serve_run_arguments_are_read_as_typed_fields():
    c = ServeConfig.from_args({"bundle": "/x/b", "replicas": "2", "max_batch": "none", "batch_wait_ms": "5",
                               "warmup": "false", "device": "cpu", "max_ongoing_requests": "7"})
    assert (c.bundle, c.replicas, c.max_batch, c.batch_wait_ms, c.warmup, c.max_ongoing_requests) == \
        ("/x/b", 2, None, 5.0, False, 7)
    assert ServeConfig.from_args({"bundle": "/x/b", "replicas": 3, "warmup": True}).replicas == 3   # YAML: typed
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['replica'\] .* it takes \[.*'replicas'"):
        ServeConfig.from_args({"bundle": "/x/b", "replica": "2"})
    with pytest.raises(ValueError, match="needs bundle=PATH"):
        ServeConfig.from_args({"replicas": "2"})
    with pytest.raises(ValueError, match="replicas='two' is not a number"):
        ServeConfig.from_args({"bundle": "/x/b", "replicas": "two"})
    with pytest.raises(ValueError, match="warmup='maybe' is not true or false"):
        ServeConfig.from_args({"bundle": "/x/b", "warmup": "maybe"})
