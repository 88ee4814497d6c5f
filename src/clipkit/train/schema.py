"""The config dataclasses as Hydra's schema: the defaults of conf/ live in them, the YAML files hold differences.

conf/config.yaml starts its defaults list with `clipkit_schema`, the root node registered here: one typed
node per group whose settings are a dataclass (model, data, optim, train), built from that dataclass's own
fields and defaults. loss and logger are objects built from their `_target_` and are left open: their files
list the constructor's arguments (tests/test_configs.py checks the names). Hydra then refuses a misspelled
key or a value of the wrong type with its own message, before anything runs; the Trainer still builds each
dataclass (its range checks run there).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from clipkit.configs import config_dir
from clipkit.data import DataConfig
from clipkit.models import ModelConfig
from clipkit.train.config import OptimConfig, TrainConfig

ROOT_SCHEMA = "clipkit_schema"
# Group -> the dataclass its YAML files configure. loss and logger are `_target_` objects (no dataclass).
GROUP_DATACLASSES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def schema_of(cls: type) -> type:
    """A dataclass with `cls`'s user fields and defaults, typed as OmegaConf can check them: a union of
    several types (`str | list[str] | None`) or an optional container becomes Any, taken as it comes."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue  # filled by the code, not a config key
        default = (
            dataclasses.field(default=f.default)
            if f.default is not dataclasses.MISSING
            else dataclasses.field(default_factory=f.default_factory)
        )
        fields.append((f.name, _checkable(hints[f.name]), default))
    return dataclasses.make_dataclass(cls.__name__, fields, kw_only=True)


def _checkable(hint):
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    others = [arm for arm in arms if arm is not type(None)]
    # OmegaConf 2.3 cannot assign a mapping or list to an Optional container that is None (AttributeError).
    if len(others) > 1 or (others and typing.get_origin(others[0]) in (dict, list)):
        return Any
    return hint


def root_schema() -> type:
    """The root node: each dataclass group typed by its schema, the `_target_` groups open."""
    schemas = {group: schema_of(cls) for group, cls in GROUP_DATACLASSES.items()}
    fields = [(group, schema, dataclasses.field(default_factory=schema)) for group, schema in schemas.items()]
    fields += [
        ("loss", Any, dataclasses.field(default=MISSING)),  # clipkit.losses.*: `_target_` + keyword arguments
        ("logger", Any, dataclasses.field(default=MISSING)),  # clipkit.train.metrics.*: the same
        # Everything a run writes goes here: config.yaml, metrics.jsonl, checkpoints/, model/. None: a
        # directory named by the settings, runs/<model>-<hash>, so running the same command again (a requeued
        # job) resumes from its checkpoints.
        ("output_dir", str | None, dataclasses.field(default=None)),
    ]
    return dataclasses.make_dataclass("ClipkitConfig", fields)


def register_schema() -> None:
    """Store the root schema in Hydra's ConfigStore under ROOT_SCHEMA (idempotent); call before composing."""
    ConfigStore.instance().store(name=ROOT_SCHEMA, node=root_schema())


def compose_config(*overrides: str) -> DictConfig:
    """conf/config.yaml composed with `overrides`, as `python -m clipkit.train` composes it."""
    register_schema()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))
