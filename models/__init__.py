"""Keras 3 CTR models (backend-agnostic) and their registry.

    import models
    model = models.build("mean_pool_dnn", {"embedding_dim": 32})
"""

from models import baseline, baselines, bilinear, dacdr, dasl, man, recguru, sasrec, syncrec  # noqa: F401  (registers their models)
from models.registry import build, default_config, names, resolve_config

__all__ = ["build", "default_config", "names", "resolve_config"]
