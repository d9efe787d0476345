"""A replica's Prometheus metrics, through Ray Serve's own metrics (ray.serve.metrics), so they
appear on every Ray node's metrics endpoint (`ray start --metrics-export-port`) with Ray's
`ray_` prefix and the deployment, replica and application tags Serve adds.

    ray_diffsparse_requests_total{path, code}     requests answered, by path and HTTP status
    ray_diffsparse_request_latency_ms{path}       request latency in the replica (histogram)
    ray_diffsparse_images_total                   images generated
    ray_diffsparse_batch_requests                 requests per `@serve.batch` call (histogram)
    ray_diffsparse_batch_samples                  samples per call, before padding (histogram)
    ray_diffsparse_padded_samples_total           padding rows run to fill static batches
    ray_diffsparse_batch_latency_ms               time to run one call's batches (histogram)

Ray Serve's own `ray_serve_*` series (queue lengths, `ray_serve_actual_batch_size`, proxy latency)
sit beside these.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

from diffsparse.serve.batches import BatchStats

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
#: the paths tagged by name; anything else is "other" (a scanner must not grow the series count)
PATHS = ("/generate", "/healthz")


class ServeMetrics:
    def __init__(self) -> None:
        self.requests = Counter("diffsparse_requests", description="HTTP requests answered, by path and status code",
                                tag_keys=("path", "code"))
        self.latency = Histogram("diffsparse_request_latency_ms", description="request latency in the replica (ms)",
                                 boundaries=LATENCY_MS, tag_keys=("path",))
        self.images = Counter("diffsparse_images", description="images generated")
        self.batch_requests = Histogram("diffsparse_batch_requests", description="requests per @serve.batch call",
                                        boundaries=SIZES)
        self.batch_samples = Histogram("diffsparse_batch_samples", description="samples per @serve.batch call "
                                       "(before padding to the bundle's batch size)", boundaries=SIZES)
        self.padded = Counter("diffsparse_padded_samples", description="padding rows run to fill static batches")
        self.batch_latency = Histogram("diffsparse_batch_latency_ms", description="time to run one @serve.batch call (ms)",
                                       boundaries=LATENCY_MS)

    def request(self, path: str, code: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        self.requests.inc(tags={"path": path, "code": str(code)})
        self.latency.observe(seconds * 1000.0, tags={"path": path})

    def batch(self, stats: BatchStats, images: int) -> None:
        self.batch_requests.observe(stats.requests)
        self.batch_samples.observe(stats.samples)
        self.batch_latency.observe(stats.seconds * 1000.0)
        if stats.padded:
            self.padded.inc(stats.padded)
        if images:
            self.images.inc(images)
