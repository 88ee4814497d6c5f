"""Model towers from open_clip: build from a name, a config or trained weights; export to open_clip."""

from clipkit.models.config import ModelConfig, list_model_configs, load_model_config
from clipkit.models.export import export_model
from clipkit.models.factory import ModelBundle, build_model, create_model
from clipkit.models.sources import ResolvedModel, TokenizerSpec, register_model_resolver, resolve
from clipkit.models.weights import UnsafeCheckpointError, load_weights, read_state_dict

__all__ = [
    "ModelBundle",
    "ModelConfig",
    "ResolvedModel",
    "TokenizerSpec",
    "UnsafeCheckpointError",
    "build_model",
    "create_model",
    "export_model",
    "list_model_configs",
    "load_model_config",
    "load_weights",
    "read_state_dict",
    "register_model_resolver",
    "resolve",
]
