"""Serving bundles on Ray Serve (optional extra: ``pip install -e '.[serve]'``).

    from ray import serve
    from diffsparse.serve import app
    serve.run(app("out/demo/bundle-sparse", replicas=2, max_batch=10))   # POST /generate, GET /healthz

`dsserve BUNDLE` does the same from the shell; `serve run diffsparse.serve:build bundle=PATH` on an
existing Ray cluster. This package imports without Ray; `app` and `build` raise ServeUnavailable
naming the install command when it is missing.
"""

from diffsparse.serve.config import ServeConfig
from diffsparse.serve.deployment import ServeUnavailable, app, build

__all__ = ["ServeConfig", "ServeUnavailable", "app", "build"]
