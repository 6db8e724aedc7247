"""Multi-process runs through ``torch.distributed``, started by ``torchrun`` (one process per GPU, or
several CPU processes with gloo).

A thin layer of primitives; the algorithms and the evaluation call them and stay unchanged in one
process, where every function here is a no-op:

* evaluation: each process takes a contiguous, disjoint shard of the evaluation indices (no padding,
  so no image counts twice) and the per-image records are gathered back in dataset order;
* calibration: every process calibrates on the same seeded images, then process 0's parameters
  and buffers are broadcast, so all processes hold bit-identical quantizers, equal to a one-process
  run (process 0 computes exactly what one process computes);
* reconstruction: every process draws the same batches and computes the gradients of its share of
  each batch's fixed gradient shards; the shards' gradients are gathered (copied, not added) and
  every process sums them in shard order, as one process does;
* only process 0 prints progress and writes files.

Example:
    >>> shard_bounds(10, rank=1, world_size=3)
    (4, 7)
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from dopq import files
from dopq.errors import DopqError

__all__ = [
    "DistributedError",
    "ProcessGroup",
    "all_gather_objects",
    "broadcast_module",
    "broadcast_object",
    "check_same",
    "closing_line",
    "current",
    "exit_with_one_line_on_sigterm",
    "gather_shards",
    "init_from_environment",
    "shard",
    "shard_bounds",
    "shutdown",
]

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a process that stopped answering before raising."""

JOIN_TIMEOUT = datetime.timedelta(minutes=2)
"""How long a process waits for the others to join the group. torchrun starts every process of a
run at once, after its machines met, so one missing for this long stopped before it joined (an
argument refused on its machine, a crash at start-up): on several machines torchrun does not stop
the others, which would wait out :data:`TIMEOUT` for it."""


class DistributedError(DopqError):
    """A multi-process run cannot go on (arguments differ between processes, too few images, ...)."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``world_size`` processes over ``backend``."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True in the process that prints and writes files (rank 0, or the only one)."""
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "launcher": launcher()}


def launcher() -> str | None:
    """How torchrun started this process, as the part of the command before dopq's own
    (``torchrun --nproc-per-node 2``; the recorded ``command`` is dopq's, the same in one process),
    or None outside torchrun. Its rendezvous options name one cluster's hosts and are left out."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    return " ".join(
        [
            "torchrun",
            *(["--nnodes", nodes] if nodes != "1" else []),
            "--nproc-per-node",
            os.environ["LOCAL_WORLD_SIZE"],
        ]
    )


def current() -> ProcessGroup:
    """The running group, or a one-process group when ``torch.distributed`` is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return ProcessGroup()
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def init_from_environment(device: str | torch.device = "cpu") -> ProcessGroup:
    """Join the process group that ``torchrun`` describes in the environment.

    Nothing happens without ``WORLD_SIZE`` > 1 (a plain one-process run). The backend is nccl for
    CUDA and gloo for the CPU; with CUDA each process takes the GPU ``LOCAL_RANK``.

    Args:
        device: the run's device (``cpu``, ``cuda``).

    Returns:
        This process's group.

    Raises:
        DistributedError: torch.distributed is missing, the rendezvous fails, or a CUDA process
            has no GPU of its own.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run one process")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.device(device).index is not None:  # every process would take that one GPU
            raise DistributedError(
                f"--device {device} under torchrun: give --device cuda (each process takes the GPU "
                "numbered by its LOCAL_RANK)"
            )
        if local >= torch.cuda.device_count():  # set_device would fail with a CUDA traceback
            raise DistributedError(
                f"a process with LOCAL_RANK {local} has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()} GPU(s); start at most that many processes per machine "
                "(torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
    started = time.monotonic()
    try:
        # torch's barrier through the store at the end of the join: every process waits there for
        # all the others, under the join's wait, whatever the backend (nccl connects lazily, at the
        # first collective, where a process that never joined was waited for as long as a working
        # one, TIMEOUT)
        with _environment_variable("TORCH_DIST_INIT_BARRIER", "1"):
            dist.init_process_group("nccl" if cuda else "gloo", timeout=JOIN_TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        if time.monotonic() - started >= 0.9 * JOIN_TIMEOUT.total_seconds():  # it timed out
            raise DistributedError(
                f"process {os.environ.get('RANK', '?')} waited {_minutes(JOIN_TIMEOUT)} for the other "
                "processes of this run to join: one stopped before it joined (see its message, on its "
                f"machine) or was not started ({reason})"
            ) from None
        raise DistributedError(f"could not join the torchrun process group: {reason}") from None
    # the join's short wait would cut a long run's collectives (one process may work alone for a
    # while) and nccl's first communicator, made through the store at the first collective
    (getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout)(TIMEOUT)
    default_store = getattr(dist.distributed_c10d, "_get_default_store", None)  # private: may go
    if default_store is not None:
        default_store().set_timeout(TIMEOUT)
    return current()


@contextmanager
def _environment_variable(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` while the block runs, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _minutes(span: datetime.timedelta) -> str:
    seconds = span.total_seconds()
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} s"


def exit_with_one_line_on_sigterm(note: str | None = None) -> None:
    """When torchrun stops this process because another one failed, say so in one line and exit 1
    (``note`` ends the line: e.g. how to resume).

    torchrun sends SIGTERM to the survivors, which are then usually blocked inside a collective (C++
    code, where a Python signal handler would not run until it times out). So SIGTERM is blocked in
    this thread and the threads it starts later, and a watcher thread takes it with ``sigwait``,
    removes half-written output files and exits at once. A process that already wrote its own
    closing line (:func:`closing_line`: it is exiting with its own error) exits without a second one.
    POSIX only (elsewhere SIGTERM keeps its default).
    """
    if not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        signal.sigwait({signal.SIGTERM})
        with _CLOSING:  # never beside (or after) the main thread's own closing line
            files.remove_pending()
            if _closed_with is not None:
                # this process already said why it stops and is on its way out; torchrun stops it
                # because another process exited first: no second line, the status it announced
                os._exit(_closed_with)
            group = current()  # left already where the process is exiting: torchrun's RANK then
            rank = group.rank if group.world_size > 1 else int(os.environ.get("RANK", "0"))
            closing_line(
                f"dopq: error: process {rank} stopped: another process of this run failed "
                "or the run was cancelled (see its message)" + (f"; {note}" if note else ""),
                1,
            )
            os._exit(1)

    threading.Thread(target=watch, name="dopq-sigterm", daemon=True).start()


_CLOSING = threading.RLock()
_closed_with: int | None = None
"""The exit status this process's closing line announced (None until one is written)."""


def closing_line(line: str, status: int) -> None:
    """Write this process's last line on stderr, saying why it stops with exit ``status``.

    One write of text and newline: under torchrun every process may fail at the same moment on one
    pipe, and separate writes (``print``'s) let their lines run together. And one line per process:
    once it is written, a SIGTERM (torchrun stops the survivors as soon as one process exits, and
    every process may be exiting with its own error) ends this process with ``status`` and no line
    of :func:`exit_with_one_line_on_sigterm`'s.
    """
    global _closed_with
    with _CLOSING:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        _closed_with = status


def shutdown() -> None:
    """Leave the process group (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s contiguous share of ``n`` items; shares differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], group: ProcessGroup | None = None) -> list[T]:
    """This process's contiguous share of ``items`` (all of them in one process).

    Concatenating the shares in rank order gives ``items`` back: what keeps gathered per-image
    records in dataset order.

    Raises:
        DistributedError: fewer items than processes (a process would get nothing).
    """
    group = group or current()
    if group.world_size > 1 and len(items) < group.world_size:
        raise DistributedError(
            f"{group.world_size} processes for {len(items)} images: use at most {len(items)} processes"
        )
    start, end = shard_bounds(len(items), group.rank, group.world_size)
    return list(items[start:end])


@contextmanager
def _collective() -> Iterator[None]:
    """A collective whose peer died (gloo: connection closed; nccl: timeout) ends in one line."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and gloo's transport errors are RuntimeErrors
        raise DistributedError(
            f"process {current().rank} stopped: another process of this run failed or stopped answering "
            f"(see its message; {str(exc).splitlines()[0][:160]})"
        ) from None


def all_gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (``[obj]`` in one process)."""
    group = current()
    if group.world_size == 1:
        return [obj]
    out: list[Any] = [None] * group.world_size
    with _collective():
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Process 0's ``obj`` on every process (``obj`` itself in one process)."""
    if current().world_size == 1:
        return obj
    box = [obj]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(what: str, value: Any, hint: str = "every process must run the same command") -> None:
    """Stop every process with one clear line if ``value`` differs between processes (``hint``
    ends the line: what to do about it).

    Raises:
        DistributedError: naming the first process whose ``value`` differs from process 0's.
    """
    values = all_gather_objects(value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise DistributedError(
                f"process {rank} differs from process 0 in its {what} "
                f"({_short(other)} vs {_short(values[0])}); {hint}"
            )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def broadcast_module(module: nn.Module) -> None:
    """Overwrite every parameter and buffer of ``module`` with process 0's, in place."""
    if current().world_size == 1:
        return
    # the same module classes (e.g. each attention's post-Softmax quantizer) and tensor shapes first:
    # a broadcast into a tensor of another shape would fail on one side and hang on the other
    check_same("model structure", [(n, type(m).__name__) for n, m in module.named_modules()])
    tensors = [*module.parameters(), *module.buffers()]
    check_same("tensor shapes", [tuple(t.shape) for t in tensors])
    with torch.no_grad(), _collective():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)
    for m in module.modules():  # quantizers keep host copies of buffer facts: read them again
        if hasattr(m, "forget_host_copies"):
            m.forget_host_copies()


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """The whole ``(total, ...)`` tensor on every process, each process holding its contiguous share
    of the rows (:func:`shard_bounds`) in ``local``; ``local`` itself in one process.

    Rows are copied, never added, so every process has the one-process values bit for bit.
    """
    group = current()
    if group.world_size == 1:
        return local
    bounds = [shard_bounds(total, rank, group.world_size) for rank in range(group.world_size)]
    most = max(end - start for start, end in bounds)
    padded = local.new_zeros((most, *local.shape[1:]))  # all_gather wants equal shapes
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in bounds]
    with _collective():
        dist.all_gather(parts, padded)
    return torch.cat([part[: end - start] for part, (start, end) in zip(parts, bounds, strict=True)])
