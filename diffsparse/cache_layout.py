"""The token cache's layout: the one home of every cache entry's name, shape, dtype and role.

A step graph carries its cache from one denoising step to the next: it takes each entry as an
input and returns the updated entry as an output named `output_name(entry)`. Which entries exist
is decided here, from the model spec (which roles each cacheable layer keeps, paper eq. 3-5 and
A.5.1), the token selector (which signals the score reads) and whether the schedule reuses tokens
at all (a dense schedule carries no layer cache, only the sampler's state).

Roles, for a layer l over N tokens of width D, with R rows (both guidance halves) and B samples:

    out    (R, N, D)  the layer's ungated output, fresh or cached (eq. 3)
    reuse  (B, N)     steps since each token was last recomputed (s3 of the score)
    key    (R, N, D)  self-attention keys   ┐ of when each token was last computed: fresh queries
    value  (R, N, D)  self-attention values ┘ attend over all N
    recv   (B, N)     attention each token received (s1 with score "attention")
    vnorm  (B, N)     the norm of each token's cached value ‖v_i‖, mean over the guidance halves
                      (s1 with score "value_norm"): kept beside the values so that a partial step
                      computes the norms of its K fresh values only, not of all N at every score
    ent    (B, N)     cross-attention entropy (s2, when λ2 weighs it)
    inp    (R, N, D)  the layer input when the token was last computed (score "cosine")
    cond   (G, R, M)  not a layer's: the conditioning rows a refresh step computed for the steps it
                      serves (`cond.modulation`, diffsparse/conditioning.py)
    textkey   (R, H, M, D/H)  a cross-attention layer's keys ┐ of its fixed text, split into its H
    textvalue (R, H, M, D/H)  and values                     ┘ heads, computed by refresh steps
                                                               (diffsparse/conditioning.py)
    sampler           a multistep sampler's state, shaped like the latent (B, ...)

Everything that reads or writes the cache — the cached and masked steps, the exporter, the
manifest, export verification and every runtime backend — asks a `CacheLayout` for names; no
cache name is spelled anywhere else. Graph input/output names derived from entries (the updated
entry `next.<name>`, a universal graph's K carrier `k.<layer>`) are spelled here too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffsparse.conditioning import CONDITIONING_OWNER, ConditioningPlan
from diffsparse.schedule import LayerRef
from diffsparse.tensors import TensorSpec


class Role(str, enum.Enum):
    OUT = "out"
    REUSE = "reuse"
    KEY = "key"
    VALUE = "value"
    RECV = "recv"
    VALUE_NORM = "vnorm"
    ENT = "ent"
    INP = "inp"
    COND = "cond"
    TEXT_KEY = "textkey"
    TEXT_VALUE = "textvalue"
    SAMPLER = "sampler"


#: roles that hold a D-wide vector per token and row; the others one number per token and sample
PER_ROW_ROLES = frozenset({Role.OUT, Role.KEY, Role.VALUE, Role.INP})
#: a cross-attention layer's text keys and values, kept when refresh steps compute them
TEXT_ROLES = (Role.TEXT_KEY, Role.TEXT_VALUE)
#: the entries of hoisted conditioning
HOISTED_ROLES = frozenset({Role.COND, *TEXT_ROLES})
#: roles that belong to no layer
STEP_ROLES = frozenset({Role.COND, Role.SAMPLER})
#: roles a layer whose K is 0 carries over unchanged (reuse counts and the cosine input are
#: bookkeeping, updated by the step's own rule)
CARRIED_ROLES = (Role.OUT, Role.KEY, Role.VALUE, Role.RECV, Role.VALUE_NORM, Role.ENT)
OUTPUT_PREFIX = "next."
CARRIER_PREFIX = "k."


def _owner(layer: LayerRef | str) -> str:
    return layer if isinstance(layer, str) else layer.name


def entry_name(role: Role, owner: LayerRef | str) -> str:
    """The cache entry of `role` for a layer (or, for the sampler, a state name)."""
    return f"{Role(role).value}.{_owner(owner)}"


def output_name(name: str) -> str:
    """Graph output name of the updated cache entry `name` (ONNX names must be unique)."""
    return OUTPUT_PREFIX + name


def carrier_name(layer: LayerRef | str) -> str:
    """The universal step graph's input whose length is the layer's K (export/universal.py)."""
    return CARRIER_PREFIX + _owner(layer)


def is_carrier(name: str) -> bool:
    return name.startswith(CARRIER_PREFIX)


class CacheLayoutError(ValueError):
    """A cache entry that does not exist, or a list of tensors that is not a cache layout."""


@dataclass(frozen=True)
class CacheEntry:
    role: Role
    owner: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return entry_name(self.role, self.owner)

    @property
    def tensor(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)


class CacheLayout:
    """The ordered cache entries of one step signature (graphs take and return them in this order)."""

    def __init__(self, entries: Iterable[CacheEntry]) -> None:
        self.entries: tuple[CacheEntry, ...] = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}
        if len(self._by_name) != len(self.entries):
            raise CacheLayoutError("cache entries must have unique names")

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def for_spec(cls, spec, selector, layer_cache: bool = True,
                 conditioning: ConditioningPlan | None = None) -> CacheLayout:
        """The layout of a model spec under a selector: each cacheable layer's roles
        (`spec.cache_roles`) over its tokens (`spec.layer_tokens`) unless `layer_cache` is False,
        the hoisted conditioning when a plan is given, then the sampler's state."""
        entries: list[CacheEntry] = []
        if layer_cache:
            for layer in spec.layers:
                n = spec.layer_tokens(layer)
                for role in spec.cache_roles(layer, selector):
                    shape = (spec.rows, n, spec.dim) if role in PER_ROW_ROLES else (spec.batch_size, n)
                    entries.append(CacheEntry(Role(role), layer.name, shape))
                text = spec.context_kv_shape(layer) if conditioning is not None and conditioning.context else None
                if text is not None:
                    entries += [CacheEntry(role, layer.name, (spec.rows, *text)) for role in TEXT_ROLES]
        if conditioning is not None:
            if not layer_cache:
                raise CacheLayoutError("hoisted conditioning is read by partial steps, which need the layer cache")
            if conditioning.width is not None:
                entries.append(CacheEntry(Role.COND, CONDITIONING_OWNER, conditioning.shape))
        latent = (spec.batch_size, *spec.latent_shape)
        entries += [CacheEntry(Role.SAMPLER, state, latent) for state in spec.sampler.state]
        return cls(entries)

    @classmethod
    def from_tensors(cls, tensors: Sequence[TensorSpec]) -> CacheLayout:
        """The layout a manifest records (its `cache` list); CacheLayoutError, naming the entry, on
        an unknown name or a repeated one (a corrupted manifest; whether the shapes fit the model is
        checked against the spec the runtime builds, runtime/bundle.py)."""
        entries = []
        for i, t in enumerate(tensors):
            role, sep, owner = t.name.partition(".")
            if not sep or not owner or role not in {r.value for r in Role}:
                raise CacheLayoutError(f"[{i}] {t.name!r} is not a cache entry name (<role>.<layer>, role one of "
                                       f"{[r.value for r in Role]})")
            entries.append(CacheEntry(Role(role), owner, tuple(t.shape), t.dtype))
        names = [e.name for e in entries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise CacheLayoutError(f"names {repeated} more than once; cache entries must have unique names")
        return cls(entries)

    def to_list(self) -> list[dict[str, Any]]:
        return [e.tensor.to_dict() for e in self.entries]

    # ---- queries -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[CacheEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheLayout) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"CacheLayout({len(self.entries)} entries: {', '.join(self.names[:6])}{', ...' if len(self) > 6 else ''})"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def output_names(self) -> list[str]:
        return [output_name(e.name) for e in self.entries]

    @property
    def tensors(self) -> list[TensorSpec]:
        return [e.tensor for e in self.entries]

    @property
    def sampler_names(self) -> list[str]:
        return [e.name for e in self.entries if e.role is Role.SAMPLER]

    @property
    def has_layer_cache(self) -> bool:
        return any(e.role not in STEP_ROLES for e in self.entries)

    @property
    def hoists_conditioning(self) -> bool:
        """Whether refresh steps compute conditioning that partial steps read (a `cond` table or
        text keys and values; diffsparse/conditioning.py)."""
        return any(e.role in HOISTED_ROLES for e in self.entries)

    @property
    def conditioning_name(self) -> str | None:
        """The hoisted conditioning's entry, or None when every step computes its own."""
        return next((e.name for e in self.entries if e.role is Role.COND), None)

    @property
    def nbytes(self) -> int:
        return sum(e.tensor.nbytes for e in self.entries)

    def has(self, role: Role, layer: LayerRef | str) -> bool:
        return entry_name(role, layer) in self._by_name

    def name(self, role: Role, layer: LayerRef | str) -> str:
        """The entry's name; CacheLayoutError if this layout has no such entry."""
        name = entry_name(role, layer)
        if name not in self._by_name:
            raise CacheLayoutError(f"the cache has no {Role(role).value!r} entry for {_owner(layer)!r}")
        return name

    def entry(self, name: str) -> CacheEntry:
        return self._by_name[name]

    def layer_entries(self, layer: LayerRef | str, roles: Iterable[Role] = tuple(Role)) -> list[str]:
        """Names of the layer's entries with one of `roles`, in layout order."""
        owner, wanted = _owner(layer), {Role(r) for r in roles}
        return [e.name for e in self.entries if e.owner == owner and e.role in wanted and e.role not in STEP_ROLES]

    def zeros(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """A zero cache (the state before the first step), one tensor per entry."""
        return [torch.zeros(e.shape, dtype=e.tensor.torch_dtype, device=device) for e in self.entries]
