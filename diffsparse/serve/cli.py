"""`dsserve BUNDLE`: serve a bundle over HTTP on Ray Serve until Ctrl-C (or SIGTERM).

Without --address it starts a Ray instance on this machine and stops it on exit; with
--address auto (or ray://...) it deploys onto a running cluster (`ray start --head`) and
removes only its own application on exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading

from diffsparse.manifest import BundleError
from diffsparse.runtime.backends.ort import PREPACK_MODES
from diffsparse.runtime.backends.select import BACKENDS
from diffsparse.runtime.backends.torch_backend import DTYPES
from diffsparse.serve.config import SERVE_DEVICES, ServeConfig
from diffsparse.serve.deployment import ServeUnavailable, application, require_serve

log = logging.getLogger("diffsparse.serve")


def _parser() -> argparse.ArgumentParser:
    d = ServeConfig
    p = argparse.ArgumentParser(prog="dsserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="the bundle folder (dsexport --out)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="replicas Ray keeps running (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="samples gathered per batch call, and the most one request may ask for (default: the bundle's "
                        "batch size)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a replica waits to fill a batch (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="where the HTTP proxy listens (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads per replica, and the CPUs each asks Ray for (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="batches one replica runs at once (default 1)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--device", default=d.device, choices=SERVE_DEVICES,
                   help="cuda: each replica asks Ray for one GPU")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="torch backend precision")
    p.add_argument("--prepack", default=d.prepack, choices=PREPACK_MODES)
    p.add_argument("--name", default=d.name, help="application name (default %(default)s)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the routes (default /)")
    p.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="the proxy answers 408 to a request that takes longer (default %(default)s)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (auto, or ray://host:10001); default: start Ray on this machine")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray instance started here (default: all)")
    p.add_argument("--dashboard", action="store_true", help="also start Ray's dashboard on the instance started here")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus metrics port of the Ray instance started here (default: Ray picks one)")
    return p


def _port_problem(host: str, port: int) -> str | None:
    """Why the proxy could not listen on host:port, or None (checked before Ray starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host"
    return None


def _resources_problem(ray, config: ServeConfig) -> str | None:
    """Why the replicas would wait forever for resources on this Ray instance, or None."""
    have = ray.cluster_resources()
    need = {"CPU": config.replicas * config.ray_actor_options()["num_cpus"],
            "GPU": config.replicas * config.ray_actor_options()["num_gpus"]}
    for kind, amount in need.items():
        if amount > have.get(kind, 0):
            return (f"{config.replicas} replica(s) need {amount:g} {kind}(s) and this Ray instance has "
                    f"{have.get(kind, 0):g}: lower --replicas or --threads, or start Ray with more (--num-cpus, "
                    "or a cluster and --address)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        require_serve()
    except ServeUnavailable as e:
        print(f"dsserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = ServeConfig(bundle=args.bundle, replicas=args.replicas, max_batch=args.max_batch,
                             batch_wait_ms=args.batch_wait_ms, backend=args.backend, device=args.device,
                             threads=args.threads, dtype=args.dtype, prepack=args.prepack, concurrency=args.concurrency,
                             name=args.name)
        app = application(config)
    except (ValueError, BundleError) as e:
        print(f"dsserve: error: {e}", file=sys.stderr)
        return 2
    local = args.address is None
    problem = _port_problem(args.host, args.port) if local else None
    if problem:
        print(f"dsserve: error: {problem}", file=sys.stderr)
        return 2
    return _serve(app, config, args, local)


def _serve(app, config: ServeConfig, args, local: bool) -> int:
    import ray  # the optional extra, present (require_serve passed)
    from ray import serve

    # "local": always a new instance here, never one another process started
    init = {"address": args.address} if not local else {"address": "local", "num_cpus": args.num_cpus,
                                                         "include_dashboard": args.dashboard}
    if local and args.metrics_port is not None:
        init["_metrics_export_port"] = args.metrics_port
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        problem = _resources_problem(ray, config) if local else None
        if problem:
            print(f"dsserve: error: {problem}", file=sys.stderr)
            return 2
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
        try:
            serve.run(app, name=config.name, route_prefix=args.route_prefix, blocking=False)
        except RuntimeError as e:  # the replicas could not start (Ray retried them)
            print(f"dsserve: error: the deployment did not start: {e}", file=sys.stderr)
            return 1
        prefix = args.route_prefix.rstrip("/")
        log.info("serving %s at http://%s:%d%s/generate (GET %s/healthz); Ctrl-C stops", config.bundle, args.host,
                 args.port, prefix, prefix)
        for node in ray.nodes():
            if node.get("Alive") and node.get("MetricsExportPort"):
                log.info("Prometheus metrics: http://%s:%s/metrics", node["NodeManagerAddress"], node["MetricsExportPort"])
        while not stop.wait(1.0):
            pass
        log.info("stopping")
        return 0
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(config.name)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
