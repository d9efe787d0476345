"""`dsserve`: errors before any work (no Ray, bad settings, a missing bundle, a busy port), and
one end-to-end run: start, serve a request, stop cleanly on Ctrl-C."""

import io
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from diffsparse.runtime import Pipeline

from diffsparse.serve.cli import main

RAY_REASON = "Ray Serve is the optional serve extra: pip install -e '.[serve]'"

_NO_RAY = """
import sys
sys.modules["ray"] = None   # as if the serve extra were not installed
from diffsparse.serve.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_dsserve_says_what_to_install_before_any_work(tmp_path):
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-c", _NO_RAY, str(tmp_path / "no-bundle")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr
    assert "dsserve: error: serving needs Ray Serve, which is not installed" in run.stderr
    assert "pip install -e '.[serve]'" in run.stderr
    assert "no-bundle" not in run.stderr   # it stopped before looking at the bundle
    assert time.monotonic() - t0 < 60


def test_bad_settings_a_missing_bundle_and_a_busy_port_fail_before_ray_starts(tiny_bundles, tmp_path, capsys):
    pytest.importorskip("ray.serve", reason=RAY_REASON)
    assert main([str(tiny_bundles["toca"]), "--replicas", "0"]) == 2
    assert "replicas (--replicas) must be a whole number of at least 1" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main([str(tiny_bundles["toca"]), "--port", str(busy.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err
    import ray
    assert not ray.is_initialized()


def test_dsserve_serves_and_stops_on_ctrl_c(tiny_bundles, client_for, unused_port):
    pytest.importorskip("ray.serve", reason=RAY_REASON)
    port = unused_port
    proc = subprocess.Popen([sys.executable, "-m", "diffsparse.serve.cli", str(tiny_bundles["toca"]), "--port", str(port),
                             "--num-cpus", "2", "--max-batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    client = client_for(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if client.health(timeout=10).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dsserve did not come up"
            time.sleep(0.5)
        r = client.generate({"class_labels": [2, 7, 1], "seed": 6, "guidance_scale": 3.0})
        assert r.status == 200, r.body
        with np.load(io.BytesIO(r.body)) as z:
            expected = Pipeline.from_bundle(tiny_bundles["toca"]).generate([2, 7, 1], seed=6, guidance_scale=3.0)
            np.testing.assert_array_equal(z["samples"], expected.samples)
        assert json.loads(client.health().body)["max_batch"] == 4
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"serving {tiny_bundles['toca'].resolve()} at http://127.0.0.1:{port}/generate" in out
    with pytest.raises(OSError):
        client.health(timeout=5)
