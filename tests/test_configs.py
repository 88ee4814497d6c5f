"""Every file under conf/ composes with the root config, and every object in it instantiates."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from clipkit.configs import config_dir
from clipkit.models import ModelConfig, build_model

CONF = config_dir()
ROOT_GROUPS = ("model", "loss", "data", "optim", "train", "logger", "experiment")


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _group_options():
    for group in ROOT_GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield pytest.param(group, path.stem, id=f"{group}={path.stem}")


def _instantiate_all(node, path="cfg"):
    """Instantiate every node that names a `_target_`, depth first; return how many."""
    count = 0
    if isinstance(node, DictConfig):
        if "_target_" in node:
            obj = instantiate(node)
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
