"""Fine-tuning controls: per-tower lr / weight decay with layer decay, tower locks, EMA, WiSE-FT, eval at start."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from clipkit.errors import ClipkitError
from clipkit.models import build_model
from clipkit.train import Trainer, run
from clipkit.train.config import OptimConfig
from clipkit.train.optim import build_optimizer
from conftest import run_clipkit
from test_train import final_weights, metrics, small_config

NO_EVAL = ("data.zeroshot_dataset=null", "data.val_shards=null")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def expected_depth(name: str) -> int:
    """Depth from the top for the tiny model (4 blocks per tower), written out by hand."""
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        if name.startswith(prefix):
            return 3 - int(name[len(prefix) :].split(".")[0])
    embeddings = {
        "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
        "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding",
    }  # fmt: skip
    return 4 if name in embeddings else 0  # heads (ln_post, proj, ln_final, text_projection), logit_scale


def test_param_groups_carry_tower_lr_times_decay_to_the_depth():
    model = build_model("tiny").model
    config = OptimConfig(lr=1e-3, weight_decay=0.1, image_lr=4e-3, text_lr=2e-3, text_weight_decay=0.05,
                         layer_decay=0.5, text_layer_decay=0.7, fused=False)  # fmt: skip
    optimizer = build_optimizer(model, config)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in model.parameters())
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        if name.startswith("visual."):
            lr, decay, wd = 4e-3, 0.5, 0.1
        elif name == "logit_scale":
            lr, decay, wd = 1e-3, 1.0, 0.1
        else:
            lr, decay, wd = 2e-3, 0.7, 0.05
        assert group["lr"] == pytest.approx(lr * decay ** expected_depth(name), rel=1e-12), name
        decayed = param.ndim >= 2 and not name.endswith(("positional_embedding", "class_embedding"))
        assert group["weight_decay"] == (wd if decayed else 0.0), name
    # Without per-tower settings: the two usual groups, as before.
    plain = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, fused=False))
    assert [(g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(1e-3, 0.1), (1e-3, 0.0)]


def test_bad_optim_and_train_values_are_one_line_errors():
    OptimConfig(lr=0.0)  # a zero-lr run is allowed
    with pytest.raises(ClipkitError, match=r"optim.lr=-1.0 must be 0 or more"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ClipkitError, match=r"optim.layer_decay=1.5 must be in \(0, 1\]"):
        OptimConfig(layer_decay=1.5)
    with pytest.raises(ClipkitError, match=r"train.ema_decay"):
        run(small_config("unused", "train.ema_decay=1.0"))


def test_lock_text_leaves_the_text_tower_bit_identical(tmp_path):
    from accelerate.utils import set_seed

    out = tmp_path / "locked"
    run(small_config(out, "train.steps=3", "train.lock_text=true", *NO_EVAL))
    set_seed(0)  # the run's seed: the same initial weights
    initial = build_model("tiny", init_logit_scale=2.659260036932778).model.state_dict()
    trained = final_weights(out)
    text = [k for k in trained if not k.startswith(("visual.", "logit_"))]
    assert len(text) > 10 and all(torch.equal(trained[k], initial[k]) for k in text)
    assert not torch.equal(trained["visual.proj"], initial["visual.proj"])

    AcceleratorState._reset_state(True)
    top = tmp_path / "top-unlocked"
    run(
        small_config(
            top, "train.steps=3", "train.lock_text=true", "train.lock_text_unlocked_groups=2", *NO_EVAL
        )
    )
    trained = final_weights(top)
    assert not torch.equal(
        trained["transformer.resblocks.3.mlp.c_fc.weight"], initial["transformer.resblocks.3.mlp.c_fc.weight"]
    )
    assert torch.equal(
        trained["transformer.resblocks.2.mlp.c_fc.weight"], initial["transformer.resblocks.2.mlp.c_fc.weight"]
    )
    assert torch.equal(trained["token_embedding.weight"], initial["token_embedding.weight"])


def record_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The model's weights before the first step and after each step (float64 copies)."""
    seen: list[dict[str, torch.Tensor]] = []
    original = Trainer.step

    def step(self, micro_batches):
        if not seen:
            seen.append({k: v.detach().double().clone() for k, v in self.unwrapped.named_parameters()})
        result = original(self, micro_batches)
        seen.append({k: v.detach().double().clone() for k, v in self.unwrapped.named_parameters()})
        return result

    monkeypatch.setattr(Trainer, "step", step)
    return seen


def test_ema_equals_a_float64_reference_and_survives_a_resume(tmp_path, monkeypatch):
    decay = 0.7  # low, so 6 steps move the average well away from both the start and the last weights
    out = tmp_path / "ema"
    weights = record_weights(monkeypatch)
    run(small_config(out, f"train.ema_decay={decay}", *NO_EVAL))
    reference = dict(weights[0])
    for step_weights in weights[1:]:
        reference = {k: decay * reference[k] + (1 - decay) * step_weights[k] for k in reference}
    exported = final_weights(out)
    worst = max((exported[k].double() - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-6
    last = weights[-1]
    assert (
        max((exported[k].double() - last[k]).abs().max().item() for k in last) > 1e-3
    )  # not the raw weights
    assert (out / "checkpoints" / "step_00000006" / "ema.safetensors").is_file()
    raw = load_file(str(out / "model-raw" / "open_clip_model.safetensors"))
    assert all(torch.equal(raw[k], last[k].float()) for k in last)  # the optimizer's own final weights
    # `clipkit export CHECKPOINT --ema` gives the run's model/ (the EMA); without --ema, the raw weights.
    for flags, expected in (["--ema"], exported), ([], raw):
        result = run_clipkit("export", str(out / "checkpoints" / "step_00000006"), *flags, "--out",
                             str(tmp_path / f"export{len(flags)}"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        written = load_file(str(tmp_path / f"export{len(flags)}" / "open_clip_model.safetensors"))
        assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert "add --ema" in result.stdout  # the raw export says the checkpoint has an EMA
    result = run_clipkit("export", str(out / "model"), "--ema", "--out", str(tmp_path / "not-a-checkpoint"))
    assert result.returncode == 2 and "holds no EMA" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    # Crash after the step-3 checkpoint, resume: the same average as the uninterrupted run.
    AcceleratorState._reset_state(True)
    monkeypatch.undo()
    crashed = tmp_path / "crashed"
    original = Trainer.step

    def crash_on_fifth(self, micro_batches):
        if self.state.step == 4:
            raise RuntimeError("simulated crash")
        return original(self, micro_batches)

    monkeypatch.setattr(Trainer, "step", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(small_config(crashed, f"train.ema_decay={decay}", *NO_EVAL))
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    run(small_config(crashed, f"train.ema_decay={decay}", "train.resume=auto", *NO_EVAL))
    resumed = final_weights(crashed)
    assert max((resumed[k] - exported[k]).abs().max().item() for k in exported) < 1e-6


def test_wise_ft_and_eval_at_start(tmp_path):
    out = tmp_path / "wise"
    result = run(small_config(out, "train.wise_ft_alpha=0.25", "train.eval_at_start=true", "train.steps=3"))
    start = load_file(str(out / "model-start" / "open_clip_model.safetensors"))
    final = final_weights(out)
    merged = load_file(str(out / "model-wise-ft" / "open_clip_model.safetensors"))
    for key in final:
        expected = 0.75 * start[key].double() + 0.25 * final[key].double()
        assert (merged[key].double() - expected).abs().max().item() < 1e-6, key
    records = metrics(out)
    first_eval = next(r for r in records if "zeroshot/acc1" in r)
    assert first_eval["step"] == 0  # evaluated before the first step
    assert any("wise_ft/zeroshot/acc1" in r for r in records)
    assert "wise_ft/zeroshot/acc1" in result and "zeroshot/acc1" in result
    assert json.loads((out / "model-wise-ft" / "open_clip_config.json").read_text()) == json.loads(
        (out / "model" / "open_clip_config.json").read_text()
    )
