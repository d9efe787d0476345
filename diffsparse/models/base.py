"""The per-model *spec*: one object per model family that drives export, buffer allocation and the
runtime (the way TensorRT's demo/Diffusion `base_model.py` does): input names and shapes, which
cache entries each layer keeps (`cache_roles`; names and shapes are the cache layout's,
diffsparse/cache_layout.py), the cached step module, MACs, sample inputs, the sampler and the
default guidance scale. Nothing outside a spec branches on the model family.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from torch import nn

from diffsparse.cache_layout import CacheLayout, Role
from diffsparse.conditioning import ConditioningPlan, plan_conditioning
from diffsparse.sampler import ForecastingSampler, SamplerPlan, sampler_config
from diffsparse.schedule import LayerRef, Schedule, SelectorConfig
from diffsparse.tensors import TensorSpec


class SpecError(ValueError):
    """A model that cannot be set up as asked: an unknown or invalid option, an unsupported
    configuration, guidance on a guidance-distilled model."""


@dataclass(frozen=True)
class StepCall:
    """The per-call inputs of a step other than the latent and the cache."""

    timestep: float
    coefficients: np.ndarray


class ModelSpec(abc.ABC):
    """Everything export and runtime need to know about one model family at one fixed batch size.

    A step graph maps (latent, step constants, conditioning, cache) -> (next latent, cache'), and
    its signature is fixed per family: `inputs` then `cache` in, `outputs` then `cache` out.
    """

    family: ClassVar[str]
    diffusers_class: ClassVar[str]
    #: the sampler kind (diffsparse.sampler.SAMPLERS) this family's pipeline uses
    sampler_kind: ClassVar[str] = "ddim"
    #: classifier-free guidance scale used when a caller gives none: the family pipeline's default
    #: in diffusers (DiTPipeline 4.0); a built-in model may set its own (make_spec)
    default_guidance_scale: ClassVar[float] = 4.0
    #: which torch.onnx exporter traces this family's step graphs: "torchscript" (dynamo=False)
    #: or "dynamo" (DESIGN.md: TorchScript fails on aten::rms_norm, dynamo's PixArt graph is
    #: rejected by ONNX Runtime)
    onnx_exporter: ClassVar[str] = "torchscript"
    #: shapes the model config does not fix (text length, resolution, frames) and their defaults;
    #: set per export (`dsexport --option name=value`) and recorded in the bundle manifest
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: whether the step runs with K read off carrier inputs (build_universal_step); a family whose
    #: step branches on K in Python cannot
    supports_universal_step: ClassVar[bool] = True

    def __init__(self, model: nn.Module, batch_size: int = 1, guidance: bool = True, sampler=None,
                 options: dict[str, Any] | None = None, guidance_scale: float | None = None) -> None:
        if batch_size < 1:
            raise SpecError(f"batch_size must be >= 1, got {batch_size}")
        unknown = sorted(set(options or {}) - set(self.OPTIONS))
        if unknown:
            raise SpecError(f"unknown option(s) {unknown} for the {self.family} family; "
                             f"it takes {sorted(self.OPTIONS) or 'none'}")
        self.options = {**self.OPTIONS, **(options or {})}
        self.model = model.eval()
        self.batch_size = batch_size
        self.guidance = guidance
        if guidance_scale is not None:
            if not np.isfinite(guidance_scale):
                raise SpecError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
            self.default_guidance_scale = float(guidance_scale)
        self.sampler = sampler if sampler is not None else self.make_sampler({})
        if self.sampler.kind != self.sampler_kind:
            raise SpecError(f"the {self.family} family samples with {self.sampler_kind!r}, not {self.sampler.kind!r}")

    @property
    def forecasts_skips(self) -> bool:
        """Whether this spec's sampler runs skipped steps on a forecast x0 (`ForecastingSampler`)."""
        return isinstance(self.sampler, ForecastingSampler) and self.sampler.skip_forecast

    def for_schedule(self, schedule: Schedule) -> ModelSpec:
        """This spec with the sampler the schedule's skipped steps need (its `skip_forecast`): the
        one place that setting goes from a schedule to a sampler. The same model, shared."""
        return self.with_skip_forecast(schedule.skip_forecast)

    def with_skip_forecast(self, forecast: bool) -> ModelSpec:
        """This spec, its sampler forecasting skipped steps or not (SpecError where the sampler cannot)."""
        if forecast == self.forecasts_skips:
            return self
        if not isinstance(self.sampler, ForecastingSampler):
            raise SpecError(f"forecasting skipped steps is not yet supported with the {self.sampler.kind!r} sampler "
                            f"({self.family} family); use skip_forecast false")
        spec = copy.copy(self)
        spec.sampler = replace(self.sampler, skip_forecast=forecast)
        return spec

    def resolve_guidance_scale(self, scale: float | None) -> float:
        """The guidance scale to sample with: `scale`, or when None the model's default (the one
        home of that rule: generation, evaluation, schedule training and export checks ask here)."""
        return self.default_guidance_scale if scale is None else float(scale)

    def int_option(self, name: str) -> int:
        """A positive integer option (token counts, sizes), or SpecError naming it."""
        value = self.options[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SpecError(f"option {name} must be a positive integer, got {value!r}")
        return int(value)

    @classmethod
    def make_sampler(cls, scheduler_config: dict[str, Any]):
        """This family's sampler (diffsparse/sampler.py) from a diffusers scheduler config
        (unsupported settings raise SamplerError). Keys of other schedulers are ignored."""
        return sampler_config(cls.sampler_kind, scheduler_config)

    # ---- structure -------------------------------------------------------------------------
    @property
    def halves(self) -> int:
        """Rows per sample: 2 with classifier-free guidance (conditional first), else 1."""
        return 2 if self.guidance else 1

    @property
    def rows(self) -> int:
        return self.batch_size * self.halves

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerRef]: ...

    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dimension."""

    @abc.abstractmethod
    def default_selector(self) -> SelectorConfig: ...

    @abc.abstractmethod
    def model_config(self) -> dict[str, Any]:
        """The diffusers config that rebuilds the model (stored in the bundle manifest)."""

    def sliced_parameters(self) -> set[str]:
        """Parameters the step graphs read only in slices (the exporter stores the slices): a
        streamed export keeps these in memory instead of writing the whole into the bundle."""
        return set()

    # ---- graph signature -------------------------------------------------------------------
    def step_inputs(self) -> list[TensorSpec]:
        """Non-cache inputs, the latent first: latent, model timestep, the sampler's per-step
        coefficients, the conditioning, and the guidance scale when guidance is on."""
        inputs = [TensorSpec("latent", (self.batch_size, *self.latent_shape)),
                  TensorSpec("timestep", (1,)),
                  TensorSpec("sampler_coef", (self.sampler.num_coefficients,)),
                  *self.conditioning_inputs()]
        if self.guidance:
            inputs.append(TensorSpec("guidance_scale", (1,)))
        return inputs

    def step_outputs(self) -> list[TensorSpec]:
        return [TensorSpec("next_latent", (self.batch_size, *self.latent_shape))]

    def score_grid(self, layer: LayerRef) -> tuple[int, int] | None:
        """The (rows, columns) layout of the layer's tokens for the spatial bonus; None for tokens
        without one (text). Video: (frames x rows, columns), so k x k tiles stay inside a frame."""
        return self.grid

    def layer_tokens(self, layer: LayerRef) -> int:
        """Tokens the layer runs over (its K is out of these); most families: num_tokens."""
        return self.num_tokens

    def cache_roles(self, layer: LayerRef, selector: SelectorConfig) -> list[Role]:
        """Which cache entries a cacheable layer keeps (diffsparse/cache_layout.py has their shapes):
        every layer its ungated output and reuse counts; a self-attention layer its keys and values,
        plus the attention each token received or its values' norms when the score reads them; a cross-attention layer
        the attention entropy when λ2 weighs it; every layer its input for the cosine score."""
        l1, l2 = selector.lambdas[:2]
        roles = [Role.OUT, Role.REUSE]
        if layer.kind == "SA":
            roles += [Role.KEY, Role.VALUE]
            if selector.score == "attention" and l1 != 0.0:
                roles.append(Role.RECV)
            if selector.score == "value_norm" and l1 != 0.0:
                roles.append(Role.VALUE_NORM)
        if layer.kind == "CA" and l2 != 0.0:
            roles.append(Role.ENT)
        if selector.score == "cosine":
            roles.append(Role.INP)
        return roles

    def cache_layout(self, selector: SelectorConfig, layer_cache: bool = True,
                     conditioning: ConditioningPlan | None = None) -> CacheLayout:
        """Every tensor carried from one step to the next: the layers' token cache (unless
        `layer_cache` is False: a schedule that never reuses tokens), the hoisted conditioning
        under a plan (`conditioning_plan`), then the sampler's state (multistep solvers)."""
        return CacheLayout.for_spec(self, selector, layer_cache, conditioning)

    # ---- hoisted conditioning (diffsparse/conditioning.py) ---------------------------------
    def conditioning_width(self) -> int | None:
        """Values per row of the conditioning a refresh step can compute for the partial steps
        it serves (the per-step modulation that depends on timestep and conditioning only), or
        None: every step computes its own. A family that returns a width implements
        `CachedStep.conditioning_rows` and reads `CachedStep.hoisted_conditioning`."""
        return None

    def conditioning_macs(self) -> int:
        """MACs per row of that conditioning (part of `fixed_macs`)."""
        return 0

    def context_kv_shape(self, layer: LayerRef) -> tuple[int, int, int] | None:
        """(heads, M, D/heads) of a cross-attention layer's keys (and values) over step-invariant
        text, per row and split into heads, when refresh steps may compute them for the partial
        steps (`_cross_attention` reads them from the cache); None: every step computes its own."""
        return None

    def context_macs(self) -> int:
        """MACs per row of those text keys and values, and of the text projection before them
        (part of `fixed_macs`)."""
        return 0

    def conditioning_plan(self, schedule: Schedule, universal: bool = False) -> ConditioningPlan | None:
        """Whether and how the schedule's steps hoist their conditioning into refresh steps: the
        one rule export, runtime and MACs ask. None for the universal step graph (its K are
        inputs, so it cannot know whether it is a refresh) and wherever
        `diffsparse.conditioning.plan_conditioning` finds nothing to gain."""
        width = self.conditioning_width()
        context = any(self.context_kv_shape(layer) is not None for layer in self.layers)
        if universal or (width is None and not context):
            return None
        refresh = [self.refreshes(row) for row in schedule.computed_keep]
        return plan_conditioning(self.schedule_plan(schedule).timesteps, refresh, width, self.rows,
                                 self.conditioning_macs(), context, self.context_macs())

    @abc.abstractmethod
    def conditioning_inputs(self) -> list[TensorSpec]:
        """The conditioning the caller supplies per batch (leading dim = batch), e.g. class labels
        or text embeddings; these are also step inputs under the same names."""

    @abc.abstractmethod
    def build_step(self, keep: Sequence[int], selector: SelectorConfig, layer_cache: bool = True,
                   conditioning: ConditioningPlan | None = None) -> nn.Module:
        """The token-cached step for one sparsity pattern; forward(*inputs, *cache) -> (*outputs, *cache').
        layer_cache False (dense steps of a schedule that never reuses): no layer cache in or out.
        conditioning: the schedule's plan (`conditioning_plan`), under which a refresh step computes
        the conditioning of its group and a partial step reads it from the cache."""

    def build_universal_step(self, selector: SelectorConfig) -> nn.Module:
        """One step module for every sparsity pattern: each layer's K is the length of a carrier
        input, so a single exported graph serves all steps (the TensorRT design of
        docs/gpu-deployment.md: one engine, one optimization profile per distinct step)."""
        if not self.supports_universal_step:
            raise NotImplementedError(f"universal step graphs are not yet supported for the {self.family!r} family")
        step = self.build_step(self.dense_keep(), selector)
        step.dynamic_k = True
        return step

    def build_masked_step(self, token_counts: Sequence[int], selector: SelectorConfig) -> nn.Module:
        """The differentiable step the schedule trainer uses: every layer computed in full and mixed
        with its cache through a token mask built from per-layer candidate weights (train/).
        forward(*inputs, *cache, weights=(L, len(token_counts))) -> (*outputs, *cache')."""
        raise NotImplementedError(f"learning a schedule is not yet supported for the {self.family!r} family")

    def feeds(self, call: StepCall, conditioning: dict[str, np.ndarray],
              guidance_scale: float) -> dict[str, np.ndarray]:
        """Numpy inputs for one step call: everything in step_inputs but the latent, which the
        backend keeps on its device from one step to the next."""
        out = {"timestep": np.asarray([call.timestep], dtype=np.float32),
               "sampler_coef": np.asarray(call.coefficients, dtype=np.float32)}
        for t in self.conditioning_inputs():
            out[t.name] = np.asarray(conditioning[t.name], dtype=t.numpy_dtype)
        if self.guidance:
            out["guidance_scale"] = np.asarray([guidance_scale], dtype=np.float32)
        return out

    def check_conditioning(self, conditioning: dict[str, np.ndarray]) -> None:
        """Raise ValueError naming the problem if the conditioning does not fit the graphs."""
        for t in self.conditioning_inputs():
            if t.name not in conditioning:
                raise ValueError(f"conditioning {t.name!r} is missing; this model needs "
                                 f"{[c.name for c in self.conditioning_inputs()]}")
            shape = np.shape(conditioning[t.name])
            if tuple(shape) != t.shape:
                raise ValueError(f"conditioning {t.name!r} must have shape {t.shape}, got {tuple(shape)}")

    def example_conditioning(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random valid conditioning for one batch (export checks, tests, benchmarks)."""
        return {t.name: rng.standard_normal(t.shape).astype(t.numpy_dtype) for t in self.conditioning_inputs()}

    def sampler_plan(self, num_steps: int, computed: Sequence[bool] | None = None) -> SamplerPlan:
        """The sampler planned for `num_steps` steps; computed: which of them evaluate the model
        (None: all; `Sampler.plan`)."""
        return self.sampler.plan(num_steps, image_seq_len=self.num_tokens, computed=computed)

    def schedule_plan(self, schedule: Schedule) -> SamplerPlan:
        """The sampler plan a schedule runs: one row per computed step (skipped steps folded in).
        SpecError when the schedule's skipped steps run another way than this spec's sampler
        (`for_schedule` gives the spec that runs them)."""
        if schedule.skip_forecast != self.forecasts_skips:
            raise SpecError(f"the schedule's skipped steps {'forecast' if schedule.skip_forecast else 'reuse'} the "
                            f"model output but the sampler's {'forecast' if self.forecasts_skips else 'reuse'} it "
                            "(skip_forecast differs): build the spec for the schedule (ModelSpec.for_schedule)")
        return self.sampler_plan(schedule.num_steps, schedule.computed)

    # ---- cost ------------------------------------------------------------------------------
    @abc.abstractmethod
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        """MACs of one cacheable layer recomputing `keep` tokens, per row."""

    @abc.abstractmethod
    def fixed_macs(self) -> int:
        """MACs per row and step outside the cacheable layers (embeddings, modulation, head)."""

    def step_macs(self, keep: Sequence[int]) -> int:
        """MACs of one step for all rows (both guidance halves of every sample)."""
        per_row = self.fixed_macs() + sum(self.layer_macs(l, k) for l, k in zip(self.layers, keep))
        return per_row * self.rows

    def graph_macs(self, keep: Sequence[int], conditioning: ConditioningPlan | None = None) -> int:
        """MACs of one step graph for `keep`, under the schedule's conditioning plan."""
        macs = self.step_macs(keep)
        if conditioning is not None:
            macs += conditioning.graph_macs_delta(self.refreshes(keep))
        return macs

    def schedule_step_macs(self, schedule: Schedule, conditioning: ConditioningPlan | None = None) -> list[int]:
        """MACs of each computed step of a schedule (a skipped step costs nothing, not listed);
        under a conditioning plan, refresh steps compute their group's conditioning and partial
        steps none (diffsparse/conditioning.py)."""
        macs = [self.step_macs(row) for row in schedule.computed_keep]
        if conditioning is not None:
            macs = [m + conditioning.step_macs_delta(k) for k, m in enumerate(macs)]
        return macs

    def schedule_macs(self, schedule: Schedule, conditioning: ConditioningPlan | None = None) -> int:
        return sum(self.schedule_step_macs(schedule, conditioning))

    def dense_keep(self) -> list[int]:
        return [self.layer_tokens(l) for l in self.layers]

    def refreshes(self, keep: Sequence[int]) -> bool:
        """Whether a step (graph) with this K row recomputes every token of every layer: a
        refresh, which computes the hoisted conditioning of its group (diffsparse/conditioning.py).
        By K, not by the schedule's `full_steps`: graphs are shared by K pattern."""
        return list(keep) == self.dense_keep()

    def dense_macs(self, num_steps: int) -> int:
        return self.step_macs(self.dense_keep()) * num_steps

    def macs_breakdown(self, schedule: Schedule, conditioning: ConditioningPlan | None = None) -> dict[str, Any]:
        """MACs of a whole run (all steps, all rows) split into the fixed part and each cacheable
        layer, dense and under the schedule (and its conditioning plan): where the saving comes from."""
        steps, rows = schedule.num_steps, self.rows
        computed = len(schedule.computed_steps)
        layers = [{"layer": l.name, "kind": l.kind,
                   "dense": self.layer_macs(l, self.layer_tokens(l)) * rows * steps,
                   "scheduled": sum(self.layer_macs(l, row[i]) for row in schedule.computed_keep) * rows}
                  for i, l in enumerate(self.layers)]
        fixed = self.fixed_macs() * rows * steps
        fixed_scheduled = self.fixed_macs() * rows * computed
        if conditioning is not None:
            fixed_scheduled += sum(conditioning.step_macs_delta(k) for k in range(computed))
        return {"fixed": fixed, "fixed_scheduled": fixed_scheduled, "layers": layers,
                "dense_total": fixed + sum(x["dense"] for x in layers),
                "scheduled_total": fixed_scheduled + sum(x["scheduled"] for x in layers)}

    def macs_ratio(self, schedule: Schedule) -> float:
        return self.schedule_macs(schedule) / self.dense_macs(schedule.num_steps)

    # ---- helpers ---------------------------------------------------------------------------
    def check_schedule(self, schedule: Schedule, num_steps: int | None = None) -> None:
        schedule.check_fits(self.family, self.layers, self.num_tokens, num_steps, self.dense_keep())


#: family name -> spec class; filled as each family module is imported (diffsparse/models/__init__.py
#: imports them all and answers lookups)
_REGISTRY: dict[str, type[ModelSpec]] = {}


def register(cls: type[ModelSpec]) -> type[ModelSpec]:
    _REGISTRY[cls.family] = cls
    return cls
