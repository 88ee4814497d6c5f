"""Model towers from open_clip: build from a name, a config or trained weights; export to open_clip.

`clipkit.models.config` (the ModelConfig dataclass, which Hydra's schema uses) stays light; everything that
loads torch and open_clip (~8 s of imports on 2 cores) is imported on first use, as `clipkit.data` does, so
that composing and checking a config (`clipkit train --cfg job`, a misspelled key) answers at once.
"""

from __future__ import annotations

from clipkit.lazy import lazy_getattr
from clipkit.models.config import ModelConfig, list_model_configs, load_model_config

# name -> the module that defines it, imported when the name is first used (PEP 562).
_LAZY = {
    "export_model": "clipkit.models.export",
    "ModelBundle": "clipkit.models.factory",
    "build_model": "clipkit.models.factory",
    "create_model": "clipkit.models.factory",
    "warn_if_random_weights": "clipkit.models.factory",
    "ResolvedModel": "clipkit.models.sources",
    "TokenizerSpec": "clipkit.models.sources",
    "register_model_resolver": "clipkit.models.sources",
    "resolve": "clipkit.models.sources",
    "UnsafeCheckpointError": "clipkit.models.weights",
    "load_weights": "clipkit.models.weights",
    "read_state_dict": "clipkit.models.weights",
}

__all__ = ["ModelConfig", "list_model_configs", "load_model_config", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)
