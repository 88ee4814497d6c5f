"""The only place that talks to other processes for a loss: layout, gather with gradient, ring shift.

Everything here works with any torch.distributed backend (NCCL on GPUs, gloo on CPU). Peer ranks are
given inside the process group and converted to global ranks where point-to-point calls need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipkit.errors import ClipkitError

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def process_layout(
    group: ProcessGroup | None, rank: int | None, world_size: int | None, *, loss_name: str
) -> tuple[int, int]:
    """(rank, world_size) of this process for a loss: the explicit values, else torch.distributed's.

    An explicit `world_size=1` means "this process alone" even inside a larger job. Any other explicit
    value must agree with torch.distributed, because a disagreement would hang the exchange.
    """
    initialised = dist.is_available() and dist.is_initialized()
    actual = (dist.get_rank(group), dist.get_world_size(group)) if initialised else (0, 1)
    rank = actual[0] if rank is None else rank
    world_size = actual[1] if world_size is None else world_size
    if world_size == 1:
        return 0, 1
    if not initialised:
        raise ClipkitError(
            f"{loss_name}(world_size={world_size}) needs torch.distributed: call "
            "torch.distributed.init_process_group first (Accelerate does), or leave world_size unset"
        )
    if (rank, world_size) != actual:
        raise ClipkitError(
            f"{loss_name}(rank={rank}, world_size={world_size}) disagrees with torch.distributed "
            f"(rank {actual[0]} of {actual[1]}): leave rank and world_size unset to take them from it"
        )
    return rank, world_size


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (b, D) rows; backward sums each rank's gradient for our rows.

    The rows travel in their own dtype (bf16 stays bf16: half the bytes, no rounding) and come out in
    `dtype`; the gradients travel and are summed in `dtype`, then rounded to the rows' dtype once, so
    a bf16 input gets the float32 sum of every rank's terms, rounded a single time.
    torch.distributed.nn.functional.all_gather does the gathering with gradient too, but is deprecated
    in favour of private APIs, so clipkit keeps this small version.
    """

    @staticmethod
    def forward(
        ctx, tensor: torch.Tensor, group: ProcessGroup | None, world_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.group, ctx.world_size, ctx.input_dtype = group, world_size, tensor.dtype
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))  # (W*b, D)
        dist.all_gather_into_tensor(gathered, tensor, group=group)
        return gathered.to(dtype)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        # Every rank's loss used our rows, so our gradient is the sum over ranks of their gradients.
        grad_gathered = grad_gathered.contiguous()  # (W*b, D) in the math dtype
        grad = grad_gathered.new_empty((grad_gathered.shape[0] // ctx.world_size, *grad_gathered.shape[1:]))
        dist.reduce_scatter_tensor(grad, grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.to(ctx.input_dtype), None, None, None


def all_gather_with_grad(
    tensor: torch.Tensor, *, group: ProcessGroup | None, world_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(b, D) on each rank -> (W*b, D) in `dtype` (default: the tensor's), rank r's rows at
    [r*b, (r+1)*b); differentiable. The exchange carries the tensor's own dtype; see _AllGatherWithGrad.
    """
    return _AllGatherWithGrad.apply(tensor, group, world_size, tensor.dtype if dtype is None else dtype)


@dataclass(frozen=True)
class Ring:
    """This process's place in a ring of `world_size` processes: data moves from left to right."""

    rank: int
    world_size: int
    group: ProcessGroup | None = None

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    @property
    def left(self) -> int:
        return self._global((self.rank - 1) % self.world_size)

    @property
    def right(self) -> int:
        return self._global((self.rank + 1) % self.world_size)

    def start_shift(self, *tensors: torch.Tensor) -> PendingShift:
        """Send `tensors` to the right neighbour and receive the left one's into new buffers.

        Every rank posts all its sends and receives in one batch_isend_irecv, so no ordering of ranks
        can deadlock; the tag tells the tensors apart (gloo matches by tag, NCCL by order).
        """
        sent = [tensor.contiguous() for tensor in tensors]
        received = [torch.empty_like(tensor) for tensor in sent]
        ops = []
        for tag, (outgoing, incoming) in enumerate(zip(sent, received, strict=True)):
            ops.append(dist.P2POp(dist.isend, outgoing, self.right, group=self.group, tag=tag))
            ops.append(dist.P2POp(dist.irecv, incoming, self.left, group=self.group, tag=tag))
        return PendingShift(dist.batch_isend_irecv(ops), sent, received)


@dataclass
class PendingShift:
    """A shift in flight; `wait()` returns the tensors received from the left neighbour."""

    requests: list
    sent: list[torch.Tensor]  # held until the sends complete
    received: list[torch.Tensor]

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        return self.received
