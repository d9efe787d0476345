"""Model families: one spec per family (importing this package registers them)."""

from diffsparse.models import dit  # noqa: F401  (registers the DiT spec)
from diffsparse.models import wan  # noqa: F401
from diffsparse.models import pixart  # noqa: F401
from diffsparse.models import flux  # noqa: F401
from diffsparse.models.base import ModelSpec, StepCall, TensorSpec, spec_class  # noqa: F401
