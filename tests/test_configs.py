"""Every file under conf/ composes with the root config, every object in it instantiates, and conf/ agrees
with the config dataclasses (the schema): the YAML files restate none of their defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from clipkit.configs import config_dir
from clipkit.data import DataConfig
from clipkit.models import ModelConfig, build_model
from clipkit.train.config import OptimConfig, TrainConfig
from clipkit.train.schema import GROUP_DATACLASSES, compose_config

CONF = config_dir()
ROOT_GROUPS = ("model", "loss", "data", "optim", "train", "logger", "experiment")


def _group_options():
    for group in ROOT_GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield pytest.param(group, path.stem, id=f"{group}={path.stem}")


def _instantiate_all(node, path="cfg"):
    """Instantiate every node that names a `_target_`, depth first; return how many."""
    count = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            # the trainer passes the loss its global batch (init_logit_bias=auto is derived from it)
            obj = instantiate(node, global_batch=64) if path == "cfg.loss" else instantiate(node)
            assert obj is not None, path
            return 1
        for key, value in node.items():
            count += _instantiate_all(value, f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            count += _instantiate_all(value, f"{path}[{i}]")
    return count


def test_root_config_has_every_group_and_output_dir():
    root = yaml.safe_load((CONF / "config.yaml").read_text())
    names = [next(iter(d)) if isinstance(d, dict) else d for d in root["defaults"]]
    assert set(ROOT_GROUPS) <= set(names)
    cfg = compose_config()
    assert (
        "output_dir" in cfg and cfg.output_dir is None
    )  # derived from the settings: train.loop.default_output_dir
    for group in ROOT_GROUPS[:-1]:
        assert group in cfg


@pytest.mark.parametrize(("group", "option"), list(_group_options()))
def test_every_config_file_composes_and_instantiates(group, option):
    cfg = compose_config(f"{group}={option}")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    _instantiate_all(cfg)
    ModelConfig.from_dict(OmegaConf.to_container(cfg.model), origin=f"conf/model (with {group}={option})")


def test_no_stray_yaml_outside_known_groups():
    groups = {p.parent.name for p in CONF.rglob("*.yaml") if p.parent != CONF}
    assert groups <= set(ROOT_GROUPS) | {"accelerate", "benchmark"}, groups


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_config_sets_the_models_logit_start(loss):
    cfg = compose_config(f"loss={loss}")
    bundle = build_model(
        ModelConfig.from_dict(OmegaConf.to_container(cfg.model)),
        init_logit_scale=cfg.loss.init_logit_scale,
        init_logit_bias=cfg.loss.init_logit_bias,
    )
    expected_scale, expected_bias = {"clip": (2.6593, None), "siglip": (2.3026, -10.0)}[loss]
    assert bundle.model.logit_scale.item() == pytest.approx(expected_scale, abs=1e-4)
    bias = getattr(bundle.model, "logit_bias", None)
    assert (bias is None) if expected_bias is None else bias.item() == pytest.approx(expected_bias)


def test_wrong_group_option_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'model/no-such'.*tiny"):
        compose_config("model=no-such")


@pytest.mark.parametrize("path", sorted((CONF / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "no"  # precision is train.precision


def _dataclass_defaults(cls) -> dict:
    """The user keys of a config dataclass and their defaults, as YAML would write them (tuples as lists)."""
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    values = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory() for f in fields
    }
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _yaml_settings(path) -> dict:
    """What a file under conf/ sets for each dataclass group: {group: {key: value}}."""
    values = yaml.safe_load(path.read_text()) or {}
    values.pop("defaults", None)
    group = path.parent.name
    if group in GROUP_DATACLASSES:
        return {group: values}
    return {g: values[g] for g in GROUP_DATACLASSES if isinstance(values.get(g), dict)}  # experiment/


def _yaml_files():
    for group in ROOT_GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield pytest.param(path, id=f"{group}/{path.name}")


@pytest.mark.parametrize("path", list(_yaml_files()))
def test_no_yaml_file_restates_a_dataclass_default(path):
    # A restated default hides drift: when the dataclass default changes, the file silently keeps the old one.
    for group, values in _yaml_settings(path).items():
        defaults = _dataclass_defaults(GROUP_DATACLASSES[group])
        for key, value in values.items():
            assert key in defaults, (
                f"{path}: {group}.{key} is not a key of {GROUP_DATACLASSES[group].__name__}"
            )
            assert value != defaults[key], (
                f"{path}: {group}.{key}: {value!r} restates {GROUP_DATACLASSES[group].__name__}'s default; delete it"
            )


@pytest.mark.parametrize(("group", "cls"), [("train", TrainConfig), ("optim", OptimConfig)])
def test_the_default_train_and_optim_files_are_the_dataclass_defaults(group, cls):
    composed = OmegaConf.to_container(compose_config()[group], resolve=True)
    assert composed == _dataclass_defaults(cls)


@pytest.mark.parametrize(("group", "cls"), list(GROUP_DATACLASSES.items()))
def test_every_dataclass_field_is_a_config_key_with_its_default(group, cls):
    # conf/experiment/quickstart.yaml sets a value in each group; whatever it leaves is the dataclass's.
    composed = OmegaConf.to_container(compose_config("experiment=quickstart")[group])
    defaults = _dataclass_defaults(cls)
    assert composed.keys() == defaults.keys()
    files = [*(CONF / group).glob("*.yaml"), CONF / "experiment" / "quickstart.yaml"]
    set_by_files = {key for path in files for key in _yaml_settings(path).get(group, {})}
    assert {k: composed[k] for k in defaults.keys() - set_by_files} == {
        k: defaults[k] for k in defaults.keys() - set_by_files
    }


def test_the_workers_default_is_one_value_for_every_data_config():
    for path in sorted((CONF / "data").glob("*.yaml")):
        assert compose_config(f"data={path.stem}").data.workers == DataConfig().workers == 2, path


@pytest.mark.parametrize("group", ["loss", "logger"])
def test_target_configs_name_only_constructor_arguments(group):
    # loss and logger are objects built from their `_target_`: every other key is an argument it takes.
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        parameters = inspect.signature(get_class(values.pop("_target_"))).parameters
        assert set(values) <= set(parameters), f"{path}: {sorted(set(values) - set(parameters))}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=5", "Key 'stpes' not in 'TrainConfig'"),
        ("optim.lrr=1e-3", "Key 'lrr' not in 'OptimConfig'"),
        ("data.batchsize=4", "Key 'batchsize' not in 'DataConfig'"),
        ("model.pretraind=x", "Key 'pretraind' not in 'ModelConfig'"),
        ("train.steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("train.lock_image=maybe", "Value 'maybe' is not a valid bool"),
    ],
)
def test_a_misspelled_key_or_a_wrong_type_fails_with_hydras_message(override, message):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(override)
    assert message in f"{error.value} {error.value.__cause__}"
