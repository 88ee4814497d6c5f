"""W gloo processes on CPU compute the same loss and gradients as one process on the concatenated batch.

Each case spawns W processes that each take their slice of one global batch and run, for both losses:
  - the gradient-caching recipe the trainer uses: features, scale and bias as leaf tensors, then
    loss.backward(); the leaves' gradients are compared with the one-process run on the whole batch;
  - plain data parallelism: small towers, loss.backward() into their parameters, gradients averaged
    over ranks (what DDP does), compared with one process on the whole batch;
  - for SigLIP, the bytes saved for backward, which must not depend on W;
  - the same losses on bf16 features: they cross processes as bf16 (half the bytes of float32) and the
    loss and gradients equal the one-process float32 math on the same bf16 values.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipkit.losses import ClipLoss, SigLipLoss

LOCAL_BATCH, INPUT_DIM, EMBED_DIM = 6, 12, 8
LOGIT_SCALE, LOGIT_BIAS = 10.0, -4.0
LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}
DEADLINE_S = 120  # a hung exchange fails the test instead of hanging CI


def global_batch(world_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234 + world_size)
    n = world_size * LOCAL_BATCH
    images = torch.randn(n, INPUT_DIM, generator=generator)
    texts = images + 0.5 * torch.randn(n, INPUT_DIM, generator=generator)  # pairs that correlate
    return {
        "image_inputs": images,
        "text_inputs": texts,
        "image_features": F.normalize(torch.randn(n, EMBED_DIM, generator=generator), dim=-1),
        "text_features": F.normalize(torch.randn(n, EMBED_DIM, generator=generator), dim=-1),
    }


class Towers(torch.nn.Module):
    """Stand-ins for the image and text towers plus the model's log-scale and bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(INPUT_DIM, EMBED_DIM)
        self.text = torch.nn.Linear(INPUT_DIM, EMBED_DIM)
        self.logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE).log())
        self.logit_bias = torch.nn.Parameter(torch.tensor(LOGIT_BIAS))

    def forward(self, image_inputs, text_inputs):
        return (
            F.normalize(self.image(image_inputs), dim=-1),
            F.normalize(self.text(text_inputs), dim=-1),
            self.logit_scale.exp(),
            self.logit_bias,
        )


def leaf_grads(loss_fn, image_features, text_features) -> dict[str, torch.Tensor]:
    """The trainer's gradient-caching call: loss on detached leaves, their gradients."""
    image = image_features.detach().clone().requires_grad_()
    text = text_features.detach().clone().requires_grad_()
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS, requires_grad=True)
    loss = loss_fn(image, text, scale, bias)
    loss.backward()
    return {
        "loss": loss.detach(),
        "image": image.grad,
        "text": text.grad,
        "scale": scale.grad,
        "bias": bias.grad,
    }


def tower_grads(loss_fn, image_inputs, text_inputs) -> dict[str, torch.Tensor]:
    towers = Towers()
    loss_fn(*towers(image_inputs, text_inputs)).backward()
    return {name: p.grad for name, p in towers.named_parameters()}


def saved_bytes(loss_fn, image_features, text_features) -> int:
    """Bytes of the tensors autograd keeps for backward, beyond the inputs themselves."""
    image = image_features.detach().clone().requires_grad_()
    text = text_features.detach().clone().requires_grad_()
    inputs = {image.untyped_storage().data_ptr(), text.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(image, text, torch.tensor(LOGIT_SCALE), torch.tensor(LOGIT_BIAS))
    loss.backward()
    return sum(storages.values())


class WireDtypes:
    """Records the dtypes of the tensors a loss's forward sends to other processes.

    Wraps (and still calls) the two torch.distributed calls clipkit.losses.distributed makes.
    """

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()
        self.recording = False
        gather, batch = dist.all_gather_into_tensor, dist.batch_isend_irecv

        def all_gather_into_tensor(output, tensor, *args, **kwargs):
            if self.recording:
                self.dtypes.add(tensor.dtype)
            return gather(output, tensor, *args, **kwargs)

        def batch_isend_irecv(ops):
            if self.recording:
                self.dtypes.update(op.tensor.dtype for op in ops if op.op is dist.isend)
            return batch(ops)

        dist.all_gather_into_tensor, dist.batch_isend_irecv = all_gather_into_tensor, batch_isend_irecv

    def of_forward(self, loss_fn, image_features, text_features) -> set[torch.dtype]:
        image_features = image_features.detach().clone().requires_grad_()
        text_features = text_features.detach().clone().requires_grad_()
        self.dtypes, self.recording = set(), True
        try:
            loss = loss_fn(image_features, text_features, torch.tensor(LOGIT_SCALE), torch.tensor(LOGIT_BIAS))
        finally:
            self.recording = False
        loss.backward()  # every rank takes part in the backward's exchange too
        return self.dtypes


def worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        batch = global_batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {key: value[rows] for key, value in batch.items()}
        results = {}
        wire = WireDtypes()
        for name, loss_class in LOSSES.items():
            loss_fn = loss_class(init_logit_scale=0.0)  # rank and world size from torch.distributed
            results[name] = leaf_grads(loss_fn, local["image_features"], local["text_features"])
            grads = tower_grads(loss_fn, local["image_inputs"], local["text_inputs"])
            for grad in grads.values():  # what DDP does to parameter gradients
                dist.all_reduce(grad)
                grad /= world_size
            results[f"{name}_towers"] = grads
            results[f"{name}_saved_bytes"] = saved_bytes(
                loss_fn, local["image_features"], local["text_features"]
            )
            image_bf16, text_bf16 = local["image_features"].bfloat16(), local["text_features"].bfloat16()
            results[f"{name}_bf16"] = leaf_grads(loss_fn, image_bf16, text_bf16)
            results[f"{name}_wire"] = {
                dtype: sorted(str(d) for d in wire.of_forward(loss_fn, *features))
                for dtype, features in [
                    ("float32", (local["image_features"], local["text_features"])),
                    ("bfloat16", (image_bf16, text_bf16)),
                ]
            }
        smoothed = ClipLoss(init_logit_scale=0.0, label_smoothing=0.2)
        results["clip_smoothed"] = leaf_grads(smoothed, local["image_features"], local["text_features"])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, tmp_path: Path) -> list[dict]:
    context = mp.start_processes(
        worker,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} loss processes did not finish in {DEADLINE_S} s (a hung exchange?)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def close(actual, expected):
    # rtol 1e-5 against the tensor's own magnitude: elementwise near-zero entries do not dominate.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


_RANKS: dict[int, list[dict]] = {}


@pytest.fixture
def ranks(world_size, tmp_path_factory) -> list[dict]:
    """The W processes' results; each W runs once for all the tests here."""
    if world_size not in _RANKS:
        _RANKS[world_size] = run_ranks(world_size, tmp_path_factory.mktemp(f"w{world_size}"))
    return _RANKS[world_size]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_processes_equal_one_process_on_the_concatenated_batch(world_size, ranks):
    batch = global_batch(world_size)
    for name, loss_class in LOSSES.items():
        single = loss_class(init_logit_scale=0.0)
        expected = leaf_grads(single, batch["image_features"], batch["text_features"])
        per_rank = [r[name] for r in ranks]

        # (a) the mean of the ranks' losses is the one-process loss
        close(torch.stack([r["loss"] for r in per_rank]).mean(), expected["loss"])
        # (b) each rank's feature gradients are W x the one-process gradients of its rows ...
        for rank, result in enumerate(per_rank):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            close(result["image"], world_size * expected["image"][rows])
            close(result["text"], world_size * expected["text"][rows])
        # ... and scale / bias gradients average to the one-process ones
        close(torch.stack([r["scale"] for r in per_rank]).mean(), expected["scale"])
        mean_bias_grad = torch.stack([r["bias"] for r in per_rank]).mean()
        if name == "clip":  # softmax ignores a shift: the bias gradient is zero up to rounding
            assert abs(mean_bias_grad) < 1e-6 and abs(expected["bias"]) < 1e-6
        else:
            close(mean_bias_grad, expected["bias"])

        # Parameter gradients after data-parallel averaging equal the one-process ones.
        expected_towers = tower_grads(single, batch["image_inputs"], batch["text_inputs"])
        for param_name, grad in expected_towers.items():
            if name == "clip" and param_name == "logit_bias":
                continue  # zero up to rounding, checked above
            close(ranks[0][f"{name}_towers"][param_name], grad)

    # SigLIP keeps the same bytes for backward whatever W: no chunk's logits are kept.
    siglip_w1 = saved_bytes(
        SigLipLoss(init_logit_scale=0.0),
        batch["image_features"][:LOCAL_BATCH],
        batch["text_features"][:LOCAL_BATCH],
    )
    assert [r["siglip_saved_bytes"] for r in ranks] == [siglip_w1] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_label_smoothing_is_exact_across_processes(world_size, ranks):
    # Each rank's rows hold all W*b logits, so the smoothed target spreads over the global row.
    batch = global_batch(world_size)
    single = ClipLoss(init_logit_scale=0.0, label_smoothing=0.2)
    expected = leaf_grads(single, batch["image_features"], batch["text_features"])
    per_rank = [r["clip_smoothed"] for r in ranks]
    close(torch.stack([r["loss"] for r in per_rank]).mean(), expected["loss"])
    unsmoothed = leaf_grads(ClipLoss(init_logit_scale=0.0), batch["image_features"], batch["text_features"])
    assert abs(float(expected["loss"] - unsmoothed["loss"])) > 1e-3  # the smoothing is in effect
    for rank, result in enumerate(per_rank):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        close(result["image"], world_size * expected["image"][rows])
        close(result["text"], world_size * expected["text"][rows])
    close(torch.stack([r["scale"] for r in per_rank]).mean(), expected["scale"])


def within_one_bf16_rounding(actual: torch.Tensor, exact: torch.Tensor) -> None:
    """`actual` (bf16) is `exact` (float32) rounded once: off by at most 2^-8 of each entry (half an ulp
    of bf16's 8 significant bits), plus float32 summation-order noise."""
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(
        actual.float(), exact, rtol=2**-8, atol=1e-6 * float(exact.abs().max()), check_dtype=False
    )


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_bf16_features_cross_as_bf16_and_keep_float32_math(world_size, ranks):
    batch = global_batch(world_size)
    # The one-process reference: the same bf16 values, upcast to float32 before the loss.
    image32 = batch["image_features"].bfloat16().float()
    text32 = batch["text_features"].bfloat16().float()
    for name, loss_class in LOSSES.items():
        # The forward exchange carries the features' own dtype: bf16 is half of float32's bytes.
        for rank in ranks:
            assert rank[f"{name}_wire"] == {"float32": ["torch.float32"], "bfloat16": ["torch.bfloat16"]}

        expected = leaf_grads(loss_class(init_logit_scale=0.0), image32, text32)
        per_rank = [r[f"{name}_bf16"] for r in ranks]
        # The loss is float32 math on exactly the values sent: float32 agreement.
        close(torch.stack([r["loss"] for r in per_rank]).mean(), expected["loss"])
        # Feature gradients: every rank's float32 terms summed, then rounded to bf16 once.
        for rank, result in enumerate(per_rank):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            within_one_bf16_rounding(result["image"], world_size * expected["image"][rows])
            within_one_bf16_rounding(result["text"], world_size * expected["text"][rows])
        # The logit parameters stay float32 and so do their gradients.
        assert per_rank[0]["scale"].dtype == torch.float32
        close(torch.stack([r["scale"] for r in per_rank]).mean(), expected["scale"])
        if name == "siglip":
            close(torch.stack([r["bias"] for r in per_rank]).mean(), expected["bias"])
