"""Load test of `dsserve`'s deployment on this machine (issue 22), loopback only:

    python benchmarks/serve_load.py --out out/serve-load    # writes out/serve-load/serve_load.json

The demo's two bundles (mnist-dit, batch 10 with guidance, DDIM 10 steps: the shipped learned
schedule `mnist-dit-joint-50` and the dense one; exported here like `dsdemo` does, or reused from
--bundles) are served side by side by one local Ray Serve, each as its own application
(/sparse, /dense). For each replica count (1, 2) and each number of closed-loop clients (1, 4,
16) the sparse and then the dense application get the same load: every client sends a
one-image request (its own label and seed), waits for the PNG, and sends the next. A level ends
after --requests requests or --seconds seconds, whichever comes first, after a short warm-up
that is not counted; the whole run stops by itself after --max-minutes.

Reported per level: throughput (images/s over the level's wall time), client-side latency
p50/p95/p99, errors (any non-200 or failed request: must be 0), and the batches formed (from
the X-Diffsparse-Batch headers: each batch's request count, exactly). Before the load, each
application's answers to a few requests are compared with `Pipeline.generate` (bit-identical).

Each replica runs ONNX Runtime with 1 thread and asks Ray for 1 CPU; Ray is told 2 x the largest
replica count in logical CPUs so that both applications stay deployed (only one is under load at
a time). The HTTP proxy, Ray's controller and the client threads share the same cores.
`--markdown FILE.json` prints the README table of an earlier run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime import Pipeline
from diffsparse.runtime.profile import host_info
from ray import serve

from diffsparse import __version__
from diffsparse.builtin_schedules import dense_schedule, resolve_schedule
from diffsparse.manifest import Manifest
from diffsparse.models.zoo import make_spec
from diffsparse.serve import app

log = logging.getLogger("serve_load")
MODEL, SCHEDULE, STEPS, BATCH = "mnist-dit", "mnist-dit-joint-50", 10, 10
BUNDLES = ("sparse", "dense")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundles(out: Path, reuse: Path | None) -> dict[str, Path]:
    """bundle-sparse and bundle-dense: from --bundles when both are there, else exported to out."""
    if reuse is not None and all((reuse / f"bundle-{n}" / "manifest.json").is_file() for n in BUNDLES):
        return {n: (reuse / f"bundle-{n}").resolve() for n in BUNDLES}
    spec = make_spec(MODEL, batch_size=BATCH)
    schedules = {"sparse": resolve_schedule(SCHEDULE, spec, STEPS, 0.5), "dense": dense_schedule(spec, STEPS)}
    paths = {}
    for name, schedule in schedules.items():
        paths[name] = (out / f"bundle-{name}").resolve()
        export_bundle(spec, schedule, paths[name], source={"model": MODEL, "seed": 0}, config=ExportConfig(overwrite=True))
        log.info("exported %s", paths[name])
    return paths


class Http:
    """One keep-alive connection to the proxy (one per client thread)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: bytes | None = None, accept: str = "image/png"):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers={"Accept": accept, "Content-Type": "application/json"})
            r = self.conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _request(k: int) -> bytes:
    return json.dumps({"class_labels": [k % 10], "seed": k}).encode()


def check_identical(port: int, prefix: str, pipe: Pipeline) -> dict:
    """A few requests against `Pipeline.generate` with the same labels and seeds (NPZ answers)."""
    client, checked, same = Http(port, 120), 0, 0
    for labels, seed in (([3], 1), ([0, 9, 4], 2), (list(range(10)), 3)):
        status, _, body = client.call("POST", f"{prefix}/generate",
                                      json.dumps({"class_labels": labels, "seed": seed}).encode(), accept="application/x-npz")
        checked += 1
        if status == 200:
            with np.load(io.BytesIO(body)) as z:
                same += int(np.array_equal(z["samples"], pipe.generate(labels, seed=seed).samples))
    client.close()
    return {"requests": checked, "bit_identical": same}


def load_level(port: int, prefix: str, clients: int, max_requests: int, max_seconds: float, warmup: int) -> dict:
    """`clients` closed-loop clients until max_requests or max_seconds; the level's figures."""
    lock = threading.Lock()
    issued = [0]
    records: list[tuple[float, int, dict]] = []   # (seconds, HTTP status, headers) of answered requests
    errors: list[str] = []                         # non-200 answers and requests that got no answer
    for k in range(warmup):   # not counted: connections, the first batches
        Http(port, 60).call("POST", f"{prefix}/generate", _request(10_000_000 + k))
    start = time.perf_counter()
    stop_at = start + max_seconds

    def client(c: int) -> None:
        conn = Http(port, 60)
        while True:
            with lock:
                if issued[0] >= max_requests or time.perf_counter() >= stop_at:
                    break
                k = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                status, headers, _ = conn.call("POST", f"{prefix}/generate", _request(k))
            except Exception as e:  # counted: a failed request is an error, not a crash of the test
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - t0
            with lock:
                records.append((seconds, status, headers))
                if status != 200:
                    errors.append(f"HTTP {status}")
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [(s, h) for s, status, h in records if status == 200]
    lat = np.array([s for s, _ in ok]) * 1000.0
    batches: dict[str, int] = {}
    for _, h in ok:
        batches[h["x-diffsparse-batch"]] = int(h["x-diffsparse-batch-requests"])
    sizes = list(batches.values())
    per_replica: dict[str, int] = {}
    for _, h in ok:
        per_replica[h["x-diffsparse-replica"]] = per_replica.get(h["x-diffsparse-replica"], 0) + 1
    unanswered = sum(1 for e in errors if not e.startswith("HTTP "))
    return {"clients": clients, "requests": len(records) + unanswered,
            "ok": len(ok), "errors": len(errors), "error_kinds": sorted(set(errors))[:5], "seconds": wall,
            "images_per_s": len(ok) / wall if wall > 0 else 0.0,
            "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                           "mean": float(lat.mean()) if len(lat) else None},
            # batches whose requests all fell inside the level (warm-up batches are not among them)
            "batches": {"count": len(sizes), "requests_mean": float(np.mean(sizes)) if sizes else None,
                        "requests_max": max(sizes, default=None),
                        "histogram": {str(n): sizes.count(n) for n in sorted(set(sizes))}},
            "requests_per_replica": sorted(per_replica.values(), reverse=True)}


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.max_minutes
    paths = bundles(out, Path(args.bundles) if args.bundles else None)
    refs = {n: Pipeline.from_bundle(p, threads=1) for n, p in paths.items()}
    info = {}
    for n, p in paths.items():
        m = Manifest.load(p, verify=False)
        info[n] = {"path": str(p), "schedule_method": m.schedule.provenance.get("method"), "macs_ratio": m.macs.get("ratio"),
                   "batch_size": m.batch_size, "guidance": m.guidance, "steps": m.schedule.num_steps,
                   "graph_calls": len(m.step_graphs)}
    port = _free_port()
    ray.init(address="local", num_cpus=2 * max(args.replicas), include_dashboard=False, log_to_driver=False)
    result = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "host": {**host_info(), "ray": ray.__version__, "diffsparse": __version__,
                       "load_average_at_start": os.getloadavg()},
              "settings": {"clients": args.clients, "replicas": args.replicas, "max_requests_per_level": args.requests,
                           "max_seconds_per_level": args.seconds, "warmup_requests": args.warmup,
                           "images_per_request": 1, "threads_per_replica": 1, "batch_wait_ms": args.batch_wait_ms,
                           "response": "image/png"},
              "bundles": info, "identical": {}, "runs": [], "skipped": []}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        for replicas in args.replicas:
            for name, p in paths.items():
                serve.run(app(p, replicas=replicas, threads=1, batch_wait_ms=args.batch_wait_ms, name=name),
                          name=name, route_prefix=f"/{name}")
                result["identical"][f"{name}, {replicas} replica(s)"] = check_identical(port, f"/{name}", refs[name])
            for clients in args.clients:
                for name in paths:
                    if time.monotonic() > deadline:
                        result["skipped"].append({"bundle": name, "replicas": replicas, "clients": clients})
                        continue
                    level = load_level(port, f"/{name}", clients, args.requests, args.seconds, args.warmup)
                    level.update(bundle=name, replicas=replicas)
                    result["runs"].append(level)
                    log.info("%s, %d replica(s), %2d clients: %5.1f images/s, p50 %.0f ms, p99 %.0f ms, errors %d, "
                             "mean batch %.1f requests", name, replicas, clients, level["images_per_s"],
                             level["latency_ms"]["p50"] or 0, level["latency_ms"]["p99"] or 0, level["errors"],
                             level["batches"]["requests_mean"] or 0)
            for name in paths:
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["host"]["load_average_at_end"] = os.getloadavg()   # other work on the machine shows here
    errors = sum(r["errors"] for r in result["runs"])
    identical = all(v["bit_identical"] == v["requests"] for v in result["identical"].values())
    result["ok"] = errors == 0 and identical and not result["skipped"]
    return result


def markdown(result: dict) -> str:
    rows = ["| replicas | clients | sparse: images/s | sparse: p50 / p95 / p99 (ms) | dense: images/s | "
            "dense: p50 / p95 / p99 (ms) | requests per batch, mean (sparse / dense) | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = {(r["replicas"], r["clients"], r["bundle"]): r for r in result["runs"]}
    for replicas in result["settings"]["replicas"]:
        for clients in result["settings"]["clients"]:
            s, d = runs.get((replicas, clients, "sparse")), runs.get((replicas, clients, "dense"))
            if s is None or d is None:
                continue

            def lat(r):
                return " / ".join(f"{r['latency_ms'][q]:.0f}" for q in ("p50", "p95", "p99"))

            rows.append(f"| {replicas} | {clients} | {s['images_per_s']:.1f} | {lat(s)} | {d['images_per_s']:.1f} | "
                        f"{lat(d)} | {s['batches']['requests_mean']:.1f} / {d['batches']['requests_mean']:.1f} | "
                        f"{s['errors'] + d['errors']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/serve-load", help="bundles and serve_load.json go here")
    p.add_argument("--bundles", default=None, help="a folder with bundle-sparse/ and bundle-dense/ (dsdemo --out) to reuse")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="closed-loop clients per level")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=240, help="requests per level at most")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per level at most")
    p.add_argument("--warmup", type=int, default=2, help="requests before each level, not counted")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--max-minutes", type=float, default=10.0, help="levels not started by then are skipped")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the table of an earlier run and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = time.perf_counter() - t0
    path = Path(args.out) / "serve_load.json"
    path.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\n{path} ({result['total_seconds']:.0f} s); ok: {result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
