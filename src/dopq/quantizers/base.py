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

from dopq.errors import ConfigError

__all__ = [
    "Consumer",
    "DropNoise",
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
# float dtypes in which quantizers do not compute (their inputs are quantized in float32)
LOW_PRECISION = (torch.float16, torch.bfloat16)


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


class DropNoise:
    """QDrop's uniform noise for one batch of ``total`` images, whatever slice of it a forward holds.

    A batch's gradient may be computed slice by slice (fixed gradient shards, in one process or
    spread over several): each quantizer call then draws the whole batch's noise, once per batch
    and per call, and takes its slice's rows, so the masks do not depend on how the batch is cut.
    Draws happen at a quantizer's first call for the batch, in forward order, which is the same in
    every slice. The rows of a tensor are its images in order, each as the same number of rows (one,
    or Swin's windows).
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.total = 0
        self.start = self.end = 0
        self._drawn: dict[tuple[int, int], torch.Tensor] = {}  # (quantizer, call) -> whole batch's
        self._calls: dict[int, int] = {}

    def new_batch(self, total: int) -> None:
        """The next forwards are of a new batch of ``total`` images; all of them until :meth:`take`."""
        self.total, self.start, self.end = total, 0, total
        self._drawn.clear()
        self._calls.clear()

    def take(self, start: int, end: int) -> None:
        """The next forward holds images ``[start, end)`` of the batch."""
        self.start, self.end = start, end
        self._calls.clear()

    def draw(self, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``owner``'s noise for ``x``, the rows of its slice of the whole batch's noise."""
        per_image, rest = divmod(x.shape[0], self.end - self.start)
        if rest:
            raise RuntimeError(
                f"QDrop: {x.shape[0]} rows are not whole images of a {self.end - self.start}-image slice"
            )
        shape = (self.total * per_image, *x.shape[1:])
        if (self.start, self.end) == (0, self.total):  # the whole batch: no other slice will ask
            return torch.rand(shape, generator=self.generator, device=x.device, dtype=x.dtype)
        call = self._calls.get(id(owner), 0)
        self._calls[id(owner)] = call + 1
        key = (id(owner), call)
        if key not in self._drawn:
            self._drawn[key] = torch.rand(shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return self._drawn[key][self.start * per_image : self.end * per_image]


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
        self.drop_noise: DropNoise | None = None  # where QDrop's noise comes from (the caller's)
        self.register_buffer("initialized", torch.tensor(False))
        self._host: dict[str, tuple[torch.Tensor, int, Any]] = {}  # see host_copy()
        self.memoize = False  # set by dopq.modules.constant_quantization (evaluation): see remembered()
        self._memos: dict[str, tuple[tuple, Any]] = {}
        self.register_state_dict_post_hook(_record_bits)

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if torch.compiler.is_exporting():
            # the codes come from host-side facts and level tables built by data-dependent Python,
            # which torch.export cannot trace: its error was a page of graph and symbolic guards
            raise ConfigError(
                "torch.export cannot trace a dopq quantized model: deploy it with "
                "dopq.export.export_onnx (ONNX, integer kernels), or run it through torch.compile or "
                "torch.jit.trace"
            )
        if x.dtype in LOW_PRECISION:
            # a float16 / bfloat16 input (autocast) gets the codes float32 arithmetic gives it: in
            # float16, TanQ's grid cell x * 2^16 overflowed at attention values near 1 (an IndexError)
            self._check_parameters_dtype()
            return self._quantized(x.float(), context).to(x.dtype)
        return self._quantized(x, context)

    def _check_parameters_dtype(self) -> None:
        """Refuse parameters cast to float16 / bfloat16 (``model.half()``): the rounded scales and
        levels are another grid than the calibrated one, whose codes nothing would flag."""
        dtype = next(
            (t.dtype for t in (*self.parameters(), *self.buffers()) if t.dtype in LOW_PRECISION), None
        )
        if dtype is not None:
            raise ConfigError(
                f"a dopq quantized model runs in float32 (float64: dopq.modules.float64_copy), not "
                f"{dtype}, which moves its calibrated grids: call model.float() (torch.autocast works), "
                "or deploy it through dopq.export"
            )

    def _quantized(self, x: torch.Tensor, context: Context) -> torch.Tensor:
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
            out = torch.where(self._noise(x) < self.drop_prob, x, out)
        return out

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_noise is None:  # no hidden draw from the global generator
            raise RuntimeError("QDrop (drop_prob > 0) needs a DropNoise in drop_noise")
        return self.drop_noise.draw(self, x)

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

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        *args: Any,
    ) -> None:
        self.forget_host_copies()  # the loaded buffers decide
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
        saved = local_metadata.get(BITS_KEY)
        if saved is not None and saved != self.bits:
            # the keys and shapes of a 4-bit quantizer's buffers are an 8-bit one's: they loaded
            # without a word, and the codes were read on another grid
            error_msgs = args[-1]
            error_msgs.append(
                f"{prefix[:-1] or type(self).__name__}: saved from a {saved}-bit quantizer, this one "
                f"has {self.bits} bits: quantize with the same recipe and widths"
            )

    def initialize(self, x: torch.Tensor, context: Context) -> None:
        raise NotImplementedError

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


# the key of a quantizer's bit width in its state dict metadata (beside torch's own "version")
BITS_KEY = "dopq_bits"


def _record_bits(module: Quantizer, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """State dict hook: the quantizer's bit width, which its buffers do not show, in its metadata,
    which ``torch.save`` keeps with the tensors and ``load_state_dict`` checks (the files of
    ``dopq.serialize`` are unchanged)."""
    local_metadata[BITS_KEY] = module.bits


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
