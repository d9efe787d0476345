"""Calibration inputs for precision work: what every step graph of a bundle sees when it samples.

Diffusion activations change with the timestep, so a calibration set drawn at one t (or from
random tensors) misjudges the others. The set is built here from the sampler itself: the bundle's
own fp32 graphs generate `batches` batches from calibration seeds (conditioning drawn per batch
from the model's conditioning distribution: for class-conditional models uniformly random labels),
and the complete inputs of every computed step are recorded as the step receives them — the
latent the sampler produced at that t, the step constants, the conditioning, and the token cache
as the previous steps left it. Each step graph is then calibrated on exactly the inputs of the
steps that run it, per timestep; a graph run at several steps gets all of them.

For a dense bundle this is the dense sampler's trajectory. For a sparse bundle it is the sparse
bundle's own fp32 trajectory (its cache entries exist only there), which is also what the
lower-precision graph will see once deployed, up to its own error. The seeds default to 1000+,
away from the evaluation seeds (dseval uses 0), so no evaluated sample is calibrated on.

The run uses the bundle's ONNX Runtime sessions (one memory map of the weights), step by step with
plain `run` calls, so every input and output is a host array that can be kept.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from diffsparse.cache_layout import output_name
from diffsparse.models.base import StepCall
from diffsparse.runtime.backends.ort import CPU_DISABLED_OPTIMIZERS, OrtBackend, import_ort, session_options
from diffsparse.runtime.bundle import Bundle
from diffsparse.sampler import initial_noise

log = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    """How the calibration set is drawn (module docstring).

    batches: batches of the bundle's static batch size generated (default 2: 20 samples for the
        mnist-dit bundles of batch 10; every one gives every computed step one more input).
    seed: the first calibration seed; batch b starts from the noise of (seed + b, i).
    guidance_scale: None = the bundle's default, as generation uses it.
    threads: ONNX Runtime intra-op threads (None: one per core).
    """

    batches: int = 2
    seed: int = 1000
    guidance_scale: float | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"calibration batches must be a whole number >= 1, got {self.batches!r}")

    def describe(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "guidance_scale": self.guidance_scale,
                "source": "the bundle's own fp32 sampler trajectory: every computed step's inputs "
                          "(latent at t, constants, conditioning, token cache) per calibration batch"}


@dataclass
class StepInputs:
    """The recorded inputs of one computed step: schedule step `index`, graph `graph`, timestep,
    and one feed dict (graph input name -> array, only the inputs that graph reads) per batch."""

    index: int
    graph: int
    timestep: float
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)


def collect_step_inputs(bundle: Bundle, config: CalibrationConfig | None = None,
                        backend: OrtBackend | None = None) -> list[StepInputs]:
    """Run the bundle's fp32 graphs over `config.batches` calibration batches and record every
    computed step's inputs (module docstring). `backend`: an already loaded OrtBackend of this
    bundle (its sessions are reused)."""
    config = config or CalibrationConfig()
    if backend is None:
        backend = OrtBackend(bundle, threads=config.threads)
        backend.load()
    m = bundle.manifest
    spec = bundle.spec
    plan = m.sampler
    scale = spec.resolve_guidance_scale(config.guidance_scale)
    latent_in, latent_out = m.inputs[0].name, m.outputs[0].name
    steps = [StepInputs(index=s["index"], graph=s["graph"], timestep=float(s["timestep"])) for s in m.steps]
    for b in range(config.batches):
        seed = config.seed + b
        conditioning = spec.example_conditioning(np.random.default_rng(seed))
        latent = initial_noise(seed, spec.batch_size, spec.latent_shape)
        cache = {t.name: t.zeros() for t in m.cache.tensors}
        for i, step in enumerate(steps):
            declared = backend.declared[step.graph]
            feeds = spec.feeds(StepCall(float(plan.timesteps[i]), plan.coefficients[i]), conditioning, scale)
            feeds[latent_in] = latent
            feeds.update(cache)
            feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in declared}
            step.feeds.append(feeds)
            out = backend.run_once(step.graph, feeds)
            latent = out[latent_out]
            for name in backend.written[step.graph]:
                cache[name] = out[output_name(name)]
        if not np.isfinite(latent).all():
            raise ValueError(f"calibration batch {b} (seed {seed}) ended in non-finite latents in fp32: the bundle "
                             "itself is broken; re-export it")
    log.info("calibration set: %d batches x %d computed steps", config.batches, len(steps))
    return steps


def inputs_by_graph(steps: list[StepInputs], num_graphs: int) -> list[list[dict[str, np.ndarray]]]:
    """Per graph, the recorded feeds of every step that runs it (all batches, in step order)."""
    out: list[list[dict[str, np.ndarray]]] = [[] for _ in range(num_graphs)]
    for s in steps:
        out[s.graph].extend(s.feeds)
    return out


class GraphRunner:
    """ONNX Runtime sessions for modified copies of a bundle's step graphs (extra outputs, other
    weights) over the bundle's own weights, without writing into the bundle folder: each copy is
    saved in a temporary folder beside a link to the bundle's weights file (ONNX Runtime checks
    that the external data a graph names exists), and every stored tensor is handed to the session
    from the bundle's memory map — or from `weights` where a caller replaces some (e.g. rounded to
    fp16). Use as a context manager; the folder is removed on exit."""

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.threads = threads
        self._ort = import_ort()
        self._dir = Path(tempfile.mkdtemp(prefix="diffsparse-graphs-"))
        # ONNX Runtime insists that the external data a graph names exists inside the graph's own
        # folder (no link out of it); every tensor comes from add_initializer, so a sparse file of
        # the right size, which takes no disk space, stands in for it
        weights = self.bundle.folder / self.bundle.manifest.weights["file"]
        with open(self._dir / weights.name, "wb") as f:
            f.truncate(weights.stat().st_size)
        self._values: dict[str, object] = {}
        self._count = 0

    def __enter__(self) -> GraphRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._values.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _value(self, name: str, array: np.ndarray | None):
        ort = self._ort
        if array is not None:
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        if name not in self._values:
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(self.bundle.weights[name])
        return self._values[name]

    def session(self, model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None):
        """A session of `model` (a bundle graph, possibly modified); `weights`: stored tensors to
        replace (name -> array). The returned session keeps what it was given alive."""
        ort = self._ort
        weights = weights or {}
        path = self._dir / f"graph_{self._count:03d}.onnx"
        self._count += 1
        onnx.save(model, str(path))
        opts = session_options()
        if self.threads and opts.use_per_session_threads:
            opts.intra_op_num_threads = self.threads
        # not ORT_ENABLE_ALL: its layout transformations read initializer values from the graph's
        # external data file (the zero stand-in above) before add_initializer's values replace them,
        # which silently zeroes weights of dynamo-exported graphs (Gemm/Conv); EXTENDED keeps the fusions
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        held = []
        for init in model.graph.initializer:
            if init.name in self.bundle.weights:
                value = self._value(init.name, weights.get(init.name))
                held.append(value)
                opts.add_initializer(init.name, value)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
        sess._diffsparse_held = held  # the initializers must outlive the session
        path.unlink()
        return sess


def with_outputs(model: onnx.ModelProto, names: list[str], elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A copy of `model` that also outputs the intermediate tensors `names` (of `elem_type`)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
            have.add(name)
    return copy


def tensor_ranges(runner: GraphRunner, model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]],
                  percentile: float | None = None) -> dict[str, tuple[float, float]]:
    """Per tensor of `names`, (lowest, highest) over every recorded input of the graph: min/max,
    or with `percentile` the min/max clipped at that percentile of |x| (a subsample of up to
    2^16 values per tensor and input). Empty tensors (K = 0) are skipped."""
    sess = runner.session(with_outputs(model, names))
    declared = {i.name for i in sess.get_inputs()}
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for f in feeds:
        outs = sess.run(names, {k: v for k, v in f.items() if k in declared})
        for n, x in zip(names, outs):
            if x.size == 0:   # a layer at K = 0 in this step (the universal graph): nothing to range
                continue
            lo[n] = min(lo[n], float(x.min()))
            hi[n] = max(hi[n], float(x.max()))
            if percentile is not None:
                flat = np.abs(x.reshape(-1))
                samples[n].append(flat if flat.size <= 1 << 16 else rng.choice(flat, 1 << 16, replace=False))
    if percentile is not None:
        for n in (n for n in names if samples[n]):
            p = float(np.percentile(np.concatenate(samples[n]), percentile))
            lo[n], hi[n] = max(lo[n], -p), min(hi[n], p)
    # a tensor empty in every input (only ever at K = 0) gets the empty range; the quantizer gives it scale 1
    return {n: (lo[n], hi[n]) if lo[n] <= hi[n] else (0.0, 0.0) for n in names}
