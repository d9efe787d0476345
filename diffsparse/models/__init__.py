"""Model families: one spec per family (importing this package registers them)."""

# importing each family module registers its spec
from diffsparse.models import dit, flux, pixart, wan  # noqa: F401
from diffsparse.models.base import ModelSpec, StepCall, TensorSpec, spec_class  # noqa: F401
