"""What a served bundle runs with: one typed config for `dsserve`, `diffsparse.serve.app` and the
`serve run diffsparse.serve:build key=value ...` builder.

Cluster-wide settings (the HTTP host and port of Ray Serve's proxies, the request timeout) are
not here: Ray Serve sets them once per cluster (`serve.start`, `dsserve --host/--port`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsparse.runtime.backends.ort import PREPACK_MODES
from diffsparse.runtime.backends.select import BACKENDS
from diffsparse.runtime.backends.torch_backend import DTYPES

#: devices a replica can ask Ray for (no "auto": the resources a replica asks for are decided on the
#: machine that deploys it, which need not be one the replicas run on)
SERVE_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ServeConfig:
    """One deployment serving one bundle. Defaults are what `dsserve BUNDLE` runs."""

    #: the bundle folder; made absolute, since replicas start in Ray's own working folders (on a
    #: cluster every node must see the bundle at this path: a shared file system or a copy per node)
    bundle: str
    #: replicas Ray keeps running; each loads the bundle once
    replicas: int = 1
    #: samples one `@serve.batch` call gathers from queued requests, and the most one request may ask
    #: for (more is HTTP 400). None: the bundle's static batch size, so one call runs one static batch
    #: (padded when the wait below ends first). A multiple of it runs several static batches per call.
    max_batch: int | None = None
    #: how long a replica waits for more requests to fill a batch once it has one (Ray's default is 10 ms)
    batch_wait_ms: float = 10.0
    #: the runtime backend and device of each replica (Pipeline.from_bundle)
    backend: str = "auto"
    device: str = "cpu"
    #: ONNX Runtime threads per replica on the CPU, and the CPUs each replica asks Ray for. 1 keeps
    #: `--replicas N` schedulable on an N-core machine; raise it for fewer, faster replicas.
    threads: int = 1
    dtype: str = "float32"
    prepack: str = "auto"
    #: batches one replica runs at the same time (the pipeline's context pool); 1 on CUDA backends
    concurrency: int = 1
    #: requests Ray sends a replica before queueing them at the proxy. None: 2 x max_batch x
    #: concurrency, so the next batch can fill while one runs
    max_ongoing_requests: int | None = None
    #: requests a proxy queues per deployment before answering 503; -1: no limit (Ray's default)
    max_queued_requests: int = -1
    #: largest request body accepted (HTTP 413 above it)
    max_body_mb: float = 64.0
    #: a replica whose batch has run this long fails Ray's health check, and Ray replaces it
    stuck_batch_s: float = 600.0
    #: Ray's health-check period for replicas
    health_check_period_s: float = 10.0
    #: run one static batch when a replica starts, so the first request does not pay for allocation
    warmup: bool = True
    #: the application and deployment name
    name: str = "diffsparse"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", str(Path(self.bundle).expanduser().resolve()))
        _whole(self.replicas, "replicas", "--replicas", 1)
        if self.max_batch is not None:
            _whole(self.max_batch, "max_batch", "--max-batch", 1)
        _whole(self.threads, "threads", "--threads", 1)
        _whole(self.concurrency, "concurrency", "--concurrency", 1)
        if self.max_ongoing_requests is not None:
            _whole(self.max_ongoing_requests, "max_ongoing_requests", "--max-ongoing-requests", 1)
        if isinstance(self.max_queued_requests, bool) or not isinstance(self.max_queued_requests, int) \
                or (self.max_queued_requests < 1 and self.max_queued_requests != -1):
            raise ValueError(f"max_queued_requests must be -1 (no limit) or a whole number of at least 1, "
                             f"got {self.max_queued_requests!r}")
        for name in ("batch_wait_ms", "max_body_mb", "stuck_batch_s", "health_check_period_s"):
            value = getattr(self, name)
            low = 0.0 if name == "batch_wait_ms" else 1e-9
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"{name} must be a finite number {'>= 0' if low == 0 else '> 0'}, got {value!r}")
        for name, allowed in (("backend", BACKENDS), ("device", SERVE_DEVICES), ("dtype", tuple(sorted(DTYPES))),
                              ("prepack", PREPACK_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.device == "cuda" and self.concurrency != 1:
            raise ValueError("concurrency > 1 is not yet supported on CUDA backends (one batch at a time per GPU): "
                             "use concurrency=1 and more replicas")
        if not self.name or "#" in self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '#' or '/', got {self.name!r}")

    # ---- derived settings ------------------------------------------------------------------
    def batch_samples(self, bundle_batch: int) -> int:
        """Samples per `@serve.batch` call (and per request at most) for a bundle of static batch size
        `bundle_batch`."""
        return self.max_batch if self.max_batch is not None else bundle_batch

    def ongoing_requests(self, bundle_batch: int) -> int:
        """Requests Ray may send one replica at once: enough to run a full batch per context and
        fill the next ones meanwhile (each request holds at least one sample)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return 2 * self.batch_samples(bundle_batch) * self.concurrency

    def ray_actor_options(self) -> dict[str, Any]:
        """The resources a replica asks Ray for: a GPU on CUDA (and a CPU to feed it), else its
        ONNX Runtime / torch threads as CPUs."""
        if self.device == "cuda":
            return {"num_cpus": 1, "num_gpus": 1}
        return {"num_cpus": self.threads, "num_gpus": 0}

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    # ---- from `serve run ... key=value` ----------------------------------------------------
    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeConfig:
        """The config from `serve run diffsparse.serve:build bundle=... replicas=2` arguments
        (strings) or a YAML config's `args:` (typed); ValueError naming a key it does not know or a
        value it cannot read."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for diffsparse.serve:build; it takes {sorted(fields)}")
        if "bundle" not in args:
            raise ValueError("diffsparse.serve:build needs bundle=PATH (the bundle folder)")
        return cls(**{k: _coerce(v, fields[k].type, k) for k, v in args.items()})


def _whole(value: Any, name: str, flag: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} ({flag}) must be a whole number of at least {low}, got {value!r}")


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """A `serve run` string (or a YAML value) as the field's type."""
    if not isinstance(value, str) or annotation == "str":
        return value
    text = value.strip()
    if "None" in annotation and text.lower() in ("none", "null", ""):
        return None
    try:
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number") from None
    if annotation == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r} is not true or false")
    return value
