"""The deployment on a local Ray Serve (2 CPUs, loopback HTTP): served results equal
`Pipeline.generate`, requests are batched, bad requests get 4xx and leave the replica up, metrics
reach Ray's Prometheus endpoint, and a killed replica gives its client an error and is replaced."""

import io
import os
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="Ray Serve is the optional serve extra: pip install -e '.[serve]'")

from diffsparse.runtime import Pipeline  # noqa: E402
from PIL import Image  # noqa: E402

from diffsparse.manifest import BundleError  # noqa: E402
from diffsparse.serve import app, build  # noqa: E402

MAX_BATCH = 400   # samples per batch call; large so that the replica-kill test has a request of seconds to kill


@pytest.fixture(scope="module")
def served(ray_serve, tiny_bundles):
    handle_app = app(tiny_bundles["toca"], max_batch=MAX_BATCH, batch_wait_ms=200, max_body_mb=0.05,
                     health_check_period_s=2.0)
    serve.run(handle_app, name="tiny", route_prefix="/")
    yield ray_serve.client, ray_serve.metrics_url
    serve.delete("tiny")


@pytest.fixture(scope="module")
def pipe(tiny_bundles):
    return Pipeline.from_bundle(tiny_bundles["toca"])


def _npz(reply):
    with np.load(io.BytesIO(reply.body)) as z:
        return {k: z[k] for k in z.files}


def test_the_app_builders_check_their_input_before_ray_runs_anything(tiny_bundles, tmp_path):
    assert isinstance(build({"bundle": str(tiny_bundles["toca"]), "replicas": "2"}), serve.Application)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['replica'\]"):
        app(tiny_bundles["toca"], replica=2)
    with pytest.raises(BundleError, match="does not exist"):
        app(tmp_path / "missing")


def test_a_replica_asks_ray_for_its_backends_resources(tiny_bundles):
    # Application._bound_deployment: the one place Ray keeps a bound deployment's options
    cpu = app(tiny_bundles["toca"], replicas=2, threads=3, max_batch=6)._bound_deployment
    assert (cpu.name, cpu.num_replicas, cpu.ray_actor_options) == ("diffsparse", 2, {"num_cpus": 3, "num_gpus": 0})
    assert cpu.max_ongoing_requests == 12   # 2 x max_batch: one batch runs while the next fills
    gpu = app(tiny_bundles["toca"], device="cuda", name="gpu")._bound_deployment
    assert (gpu.name, gpu.ray_actor_options) == ("gpu", {"num_cpus": 1, "num_gpus": 1})


def test_healthz_describes_the_replica(served, tiny_bundles):
    client, _ = served
    r = client.health()
    assert r.status == 200
    h = r.json()
    assert h["status"] == "ok" and h["bundle"] == str(tiny_bundles["toca"].resolve())
    assert (h["backend"], h["device"], h["batch_size"], h["max_batch"]) == ("onnxruntime", "cpu", 2, MAX_BATCH)
    assert h["conditioning"] == [{"name": "class_labels", "shape": [], "dtype": "int32"}]
    assert h["guidance"] is True and h["default_guidance_scale"] == 4.0 and h["pid"] > 0


def test_concurrent_requests_are_batched_and_match_pipeline_generate(served, pipe):
    client, _ = served
    bodies = [{"class_labels": [i % 10, (3 * i) % 10][: 1 + i % 2], "seed": 100 + i,
               "guidance_scale": None if i % 3 else 2.5} for i in range(8)]
    replies = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i):
        start.wait()
        replies[i] = client.generate(bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batches = {}
    for body, reply in zip(bodies, replies):
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"] == "application/x-npz"
        got = _npz(reply)
        alone = pipe.generate(body["class_labels"], seed=body["seed"], guidance_scale=body["guidance_scale"])
        np.testing.assert_array_equal(got["samples"], alone.samples)
        np.testing.assert_array_equal(got["class_labels"], body["class_labels"])
        assert int(got["seed"]) == body["seed"] and float(got["guidance_scale"]) == alone.guidance_scale
        batches.setdefault(reply.headers["x-diffsparse-batch"], []).append(reply)
    # every batch's request count is the number of these replies that name it: all traffic is ours
    for members in batches.values():
        assert {int(r.headers["x-diffsparse-batch-requests"]) for r in members} == {len(members)}
    assert max(len(m) for m in batches.values()) >= 2, "no two requests were batched together"


def test_png_is_the_grid_of_the_samples(served, pipe):
    client, _ = served
    r = client.generate({"class_labels": [4, 2, 7], "seed": 3, "scale": 2}, accept="image/png")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    expected = pipe.generate([4, 2, 7], seed=3).grid(scale=2)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.body))), np.asarray(expected))
    assert r.headers["x-diffsparse-guidance-scale"] == "4.0" and r.headers["x-diffsparse-seed"] == "3"


def test_bad_requests_get_4xx_with_the_reason_and_leave_the_replica_up(served, pipe):
    client, _ = served
    pid = client.health().json()["pid"]
    cases = [
        (client.generate(b"{not json"), 400, "malformed JSON"),
        (client.generate({"class_labels": [3, 10]}), 400, r"class labels must be in [0, 9]"),
        (client.generate({"class_labels": ["three"]}), 400, "class labels must be whole numbers"),
        (client.generate({"conditioning": {"class_labels": [[1, 2]]}}), 400, "must have shape (2,)"),
        (client.generate({"conditioning": {"prompt_embeds": [[0.5]]}}), 400, "is not an input of this model"),
        (client.generate({"class_labels": [1] * (MAX_BATCH + 1)}), 400,
         f"asks for {MAX_BATCH + 1} samples; this server takes at most {MAX_BATCH}"),
        (client.generate({"class_labels": [1], "pad": " " * 60_000}), 413, "more than this server takes"),
        (client.generate({"class_labels": [1]}, accept="text/html"), 406, "ask for image/png"),
        (client.request("GET", "/generate"), 405, "use POST"),
        (client.request("POST", "/healthz"), 405, "use GET"),
        (client.request("GET", "/nowhere"), 404, "POST /generate and GET /healthz"),
    ]
    for reply, status, message in cases:
        assert reply.status == status, (message, reply.body)
        assert message in reply.json()["error"]
    assert client.health().json()["pid"] == pid, "a bad request restarted the replica"
    r = client.generate({"class_labels": [5], "seed": 8})
    assert r.status == 200
    np.testing.assert_array_equal(_npz(r)["samples"], pipe.generate([5], seed=8).samples)


def _series(text: str, name: str, **tags) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_reach_rays_prometheus_endpoint(served):
    client, metrics_url = served
    assert client.generate({"class_labels": [1, 2, 3]}).status == 200
    assert client.generate({"class_labels": [99]}).status == 400
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        if _series(text, "ray_diffsparse_requests_total", path="/generate", code="400") >= 1 and \
                _series(text, "ray_diffsparse_images_total") >= 3:
            break
        time.sleep(1)
    assert _series(text, "ray_diffsparse_requests_total", path="/generate", code="200", application="tiny") >= 1
    assert _series(text, "ray_diffsparse_requests_total", path="/generate", code="400") >= 1
    assert _series(text, "ray_diffsparse_request_latency_ms_count", path="/generate") >= 2
    assert _series(text, "ray_diffsparse_images_total") >= 3
    assert _series(text, "ray_diffsparse_batch_samples_count") >= 1
    assert _series(text, "ray_diffsparse_batch_requests_sum") >= 1
    assert _series(text, "ray_diffsparse_padded_samples_total") >= 1   # 3 samples ran as 2 static batches of 2


def test_a_killed_replica_fails_its_request_cleanly_and_is_replaced(served, pipe):
    client, _ = served
    pid = client.health().json()["pid"]
    result = {}

    def long_request():
        t0 = time.monotonic()
        result["reply"] = client.generate({"class_labels": [i % 10 for i in range(MAX_BATCH)], "seed": 1}, timeout=120)
        result["done"] = time.monotonic()
        result["seconds"] = result["done"] - t0

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 60
    while client.health().json()["batches_running"] < 1:
        assert time.monotonic() < deadline, "the long request never started running"
        time.sleep(0.02)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    worker.join(90)
    assert not worker.is_alive(), "the client hung after its replica died"
    reply = result["reply"]
    assert reply.status >= 500, reply.body
    assert result["done"] - killed < 30
    # Ray starts a new replica; requests meanwhile wait for it (or fail fast), none hangs
    deadline = time.monotonic() + 120
    while True:
        try:
            h = client.health(timeout=30)
            if h.status == 200 and h.json()["pid"] != pid:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the replica was not replaced"
        time.sleep(0.5)
    r = client.generate({"class_labels": [6, 1], "seed": 4})
    assert r.status == 200
    np.testing.assert_array_equal(_npz(r)["samples"], pipe.generate([6, 1], seed=4).samples)
