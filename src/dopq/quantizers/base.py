"""Quantizer base module, granularities and the quantizer registry.

A quantizer is a small ``nn.Module`` around pure tensor math: it holds its parameters as buffers,
initialises them from the first tensor it sees while ``observing`` (calibration), and then
fake-quantizes. It knows nothing about models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Consumer",
    "PerChannel",
    "PerTensor",
    "Quantizer",
    "build_quantizer",
    "list_quantizers",
    "quantizer_name",
    "register_quantizer",
]


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor, e.g. ``(B, N, C) -> scale (1,)``."""


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index of ``axis``.

    Example: weights ``(out, in)`` with ``axis=0`` get ``(out,)`` scales; activations
    ``(B, N, C)`` with ``axis=-1`` get ``(C,)`` scales.
    """

    axis: int


Granularity = PerTensor | PerChannel


@dataclass(frozen=True)
class Consumer:
    """The product a quantized tensor ``x`` enters, ``left @ x @ right`` (a factor may be None):
    an output-aware range search scores its candidates by the error they cause there.

    A quantizer's ``context`` is either one of these or a bare tensor, which means the right factor
    (``x @ context``: the ``v`` of ``attn @ v``, the transposed weight of a Linear).
    """

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def detach(self) -> Consumer:
        return Consumer(*(None if t is None else t.detach() for t in (self.left, self.right)))


Context = torch.Tensor | Consumer | None


class Quantizer(nn.Module):
    """Base class: lazy initialisation while observing, then fake quantization.

    Subclasses implement ``initialize(x, context)`` and ``fake_quantize(x)``. ``context`` is the
    optional product the tensor enters (a :class:`Consumer`, or its right factor as a bare tensor),
    which some searches use (TanQ scores candidates by ``attn @ v`` error).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.bits = bits
        self.enabled = True
        self.observing = False
        self.drop_prob = 0.0  # QDrop: probability of passing an element through unquantized
        self.drop_generator: torch.Generator | None = None  # the caller's generator for QDrop masks
        # data parallelism: (start, end, total), this process's images of the batch (see drop_noise)
        self.drop_share: tuple[int, int, int] | None = None
        self.register_buffer("initialized", torch.tensor(False))
        self._host: dict[str, tuple[torch.Tensor, int, Any]] = {}  # see host_copy()
        self.memoize = False  # set by dopq.modules.constant_quantization (evaluation): see remembered()
        self._memos: dict[str, tuple[tuple, Any]] = {}

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.is_ready():
            if not self.observing:
                raise RuntimeError(f"{type(self).__name__} has no parameters yet: calibrate the model first")
            with torch.no_grad():
                self.initialize(x.detach(), None if context is None else context.detach())
            self.initialized.fill_(True)
        if isinstance(x, nn.Parameter):  # a weight: the same output until it or this quantizer changes
            out = self.remembered("parameter", lambda: self.fake_quantize(x), x)
        else:
            out = self.fake_quantize(x)
        if self.drop_prob > 0:
            out = torch.where(self.drop_noise(x) < self.drop_prob, x, out)
        return out

    def drop_noise(self, x: torch.Tensor) -> torch.Tensor:
        """QDrop's uniform noise for ``x``. With a ``drop_share`` (this process's images ``[start,
        end)`` of a batch of ``total``) the whole batch's noise is drawn and this share's rows taken,
        so each process draws what one process would; ``x``'s first axis holds the share's images in
        order, each as the same number of rows (one, or Swin's windows)."""
        if self.drop_share is None:
            return torch.rand(x.shape, generator=self.drop_generator, device=x.device, dtype=x.dtype)
        start, end, total = self.drop_share
        rows, rest = divmod(x.shape[0], end - start)
        if rest:
            raise RuntimeError(
                f"QDrop: {x.shape[0]} rows are not whole images of a {end - start}-image share"
            )
        shape = (total * rows, *x.shape[1:])
        noise = torch.rand(shape, generator=self.drop_generator, device=x.device, dtype=x.dtype)
        return noise[start * rows : end * rows]

    def is_ready(self) -> bool:
        """Whether the parameters are set (a host copy of ``initialized``: no device read per call)."""
        return self.host_copy("ready", self.initialized, bool)

    def host_copy(self, slot: str, tensor: torch.Tensor, read: Callable[[torch.Tensor], Any]) -> Any:
        """``read(tensor)``, kept on the host and read again only when ``tensor`` changes: another
        tensor object, or an in-place write (which moves its version counter). Reading a GPU tensor
        synchronises the device, about ten times per DeiT block if done on every call; its version
        is a host-side counter. A write through ``.data`` moves no version: call
        :meth:`forget_host_copies` after one."""
        memo = self._host.get(slot)
        if memo is not None and memo[0] is tensor:
            if torch.compiler.is_compiling():  # traced code cannot read versions; the copy is what it uses
                return memo[2]
            try:
                if memo[1] == tensor._version:
                    return memo[2]
            except RuntimeError:  # an inference-mode tensor keeps no version
                pass
        value = read(tensor)
        try:
            self._host[slot] = (tensor, tensor._version, value)
        except RuntimeError:  # no version to compare: read it every time
            self._host.pop(slot, None)
        return value

    def remembered(self, slot: str, make: Callable[[], Any], *inputs: torch.Tensor) -> Any:
        """``make()``, computed once and reused while :attr:`memoize` is on (an evaluation:
        :func:`dopq.modules.constant_quantization`), autograd is off, and neither ``inputs`` nor this
        quantizer's own tensors changed: a quantized weight or a level table is a constant of an
        evaluation, and recomputing it per batch costs a GPU many small kernel launches.

        A tensor counts as unchanged while it is the same object at the same in-place version
        holding the same storage (a ``.to()`` or ``.data`` swap gives new storage). The stamp keeps
        those storages alive, so no new tensor can take over an address it remembers. Writes
        through ``.data`` bump no version: that is why memoizing is scoped to an evaluation.
        """
        if not self.memoize or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return make()
        tensors = (*inputs, *self._parameters.values(), *self._buffers.values())
        try:
            stamp = tuple((t, t.data, t._version, t.data_ptr()) for t in tensors if t is not None)
        except RuntimeError:  # inference-mode tensors keep no version: nothing to compare
            return make()
        stamp += (self.enabled, self.bits)
        memo = self._memos.get(slot)
        if memo is not None and _same_stamp(memo[0], stamp):
            return memo[1]
        value = make()
        self._memos[slot] = (stamp, value)
        return value

    def reset(self) -> None:
        """Forget the parameters so the next observed tensor re-initialises them."""
        self.initialized.fill_(False)
        self.forget_host_copies()

    def read_host_copies(self) -> None:
        """Read the host-side copies now (e.g. before ``torch.compile`` traces the model, where a
        device read would split the graph)."""
        self.is_ready()

    def forget_host_copies(self) -> None:
        """Drop the host-side copies of buffer facts and the remembered tensors (read again on next
        use): after a buffer was written through ``.data``, which moves no version."""
        self._host.clear()
        self._memos.clear()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.forget_host_copies()  # the loaded buffers decide
        super()._load_from_state_dict(*args, **kwargs)

    def initialize(self, x: torch.Tensor, context: Context) -> None:
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


def _same_stamp(a: tuple, b: tuple) -> bool:
    if len(a) != len(b) or a[-2:] != b[-2:]:
        return False
    return all(x[0] is y[0] and x[2:] == y[2:] for x, y in zip(a[:-2], b[:-2], strict=True))


_QUANTIZERS: dict[str, Callable[..., Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator adding a quantizer under ``name``; duplicate names raise."""

    def add(cls: type[Quantizer]) -> type[Quantizer]:
        if name in _QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is already registered")
        _QUANTIZERS[name] = cls
        return cls

    return add


def list_quantizers() -> list[str]:
    """Names accepted by :func:`build_quantizer`."""
    return sorted(_QUANTIZERS)


def build_quantizer(name: str, bits: int, **kwargs: object) -> Quantizer:
    """Instantiate a registered quantizer, e.g. ``build_quantizer("tanq", 4)``."""
    if name not in _QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose from {list_quantizers()}")
    return _QUANTIZERS[name](bits, **kwargs)


def quantizer_name(q: Quantizer) -> str:
    """The registered name of ``q``'s class (its class name if it was never registered)."""
    return next((name for name, cls in _QUANTIZERS.items() if type(q) is cls), type(q).__name__)
