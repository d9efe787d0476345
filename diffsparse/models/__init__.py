"""Model families: one spec per family. Importing this package imports every family module, which
registers its spec; `spec_class` and `registered_families` answer from that registry."""

from diffsparse.models import dit, flux, pixart, wan  # noqa: F401  (each registers its spec)
from diffsparse.models.base import _REGISTRY, ModelSpec


def registered_families() -> dict[str, type[ModelSpec]]:
    return dict(_REGISTRY)


def spec_class(family: str) -> type[ModelSpec]:
    if family not in _REGISTRY:
        raise KeyError(f"model family {family!r} is not supported; supported: {sorted(_REGISTRY)}")
    return _REGISTRY[family]
