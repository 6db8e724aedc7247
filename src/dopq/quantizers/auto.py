"""Per-module choice of the post-Softmax quantizer family (``softmax_quantizer="auto"``).

Every candidate family (TanQ, log2, log-sqrt2) runs its own parameter search on the module's
calibration attention map; the one whose fake-quantized map gives the smallest ``attn @ v`` error
on that same map is kept. The candidates stay as children, so a saved model is rebuilt with the
same structure from its recipe and the ``choice`` buffer in its state restores the family; codes,
levels and the deploy form all come from the chosen candidate (:meth:`resolve`).
"""

from __future__ import annotations

import torch
from torch import nn

from dopq.quantizers.base import build_quantizer, register_quantizer
from dopq.quantizers.levels import LevelQuantizer
from dopq.quantizers.tanq import DEFAULT_CENTERS, TanQQuantizer  # noqa: F401  (registers "tanq")
from dopq.quantizers.uniform import DEFAULT_PERCENTILES

__all__ = ["AUTO_CANDIDATES", "AutoLevelQuantizer", "output_error"]

AUTO_CANDIDATES = ("tanq", "log2", "logsqrt2")


def output_error(x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor | None) -> float:
    """Mean squared error of ``x_hat @ values`` against ``x @ values`` (of ``x_hat`` without values).

    Shapes: ``x``/``x_hat`` ``(..., N_q, N)``, ``values`` ``(..., N, D)`` with the same leading dims.
    """
    diff = (x_hat - x).float()
    if values is not None:
        diff = diff @ values.float()
    return float(diff.pow(2).mean())


@register_quantizer("auto")
class AutoLevelQuantizer(LevelQuantizer):
    """The best of several post-Softmax quantizers, chosen per module on calibration data.

    Args:
        bits: bit width of every candidate.
        objective: TanQ's own search objective (``"output"`` or ``"mse"``).
        centers: TanQ's candidate centres.
        grid_bits: TanQ's threshold grid (``TanQQuantizer``'s ``grid_bits``).
        percentiles: the log quantizers' candidate clip quantiles.
        candidates: registered quantizer names to choose from.

    Example:
        >>> q = AutoLevelQuantizer(3); q.observing = True
        >>> a = torch.softmax(torch.randn(2, 4, 16, 16) * 3, -1); v = torch.randn(2, 4, 16, 8)
        >>> _ = q(a, v); q.kind in AUTO_CANDIDATES and torch.equal(q(a), q.resolve()(a))
        True
    """

    def __init__(
        self,
        bits: int,
        objective: str = "output",
        percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
        candidates: tuple[str, ...] = AUTO_CANDIDATES,
        centers: tuple[float, ...] = DEFAULT_CENTERS,
        grid_bits: int | None = None,
    ) -> None:
        super().__init__(bits)
        if not candidates:
            raise ValueError("auto post-Softmax quantizer needs at least one candidate")
        built = {
            name: build_quantizer(name, bits, objective=objective, centers=centers, grid_bits=grid_bits)
            if name == "tanq"
            else build_quantizer(name, bits, percentiles=percentiles)
            for name in candidates
        }
        self.candidates = nn.ModuleDict(built)
        self.register_buffer("choice", torch.tensor(0))
        self.errors: dict[str, float] = {}  # the last selection's output error per candidate

    @property
    def kind(self) -> str:
        """Registered name of the chosen candidate."""
        return list(self.candidates)[self.host_copy("choice", self.choice, int)]

    def read_host_copies(self) -> None:
        super().read_host_copies()
        self.resolve().read_host_copies()

    def resolve(self) -> LevelQuantizer:
        return self.candidates[self.kind]

    def reset(self) -> None:
        super().reset()
        for q in self.candidates.values():
            q.reset()

    def initialize(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        errors = {}
        for name, q in self.candidates.items():
            q.initialize(x, context)
            q.initialized.fill_(True)
            errors[name] = output_error(x, q.fake_quantize(x), context)
        self.errors = errors
        # min() keeps the first of equal errors: candidates are in preference order
        best = min(range(len(errors)), key=lambda i: list(errors.values())[i])
        self.choice.fill_(best)

    def level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resolve().level_table()

    def code_grid(self) -> tuple[int, torch.Tensor] | None:
        return self.resolve().code_grid()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.resolve().codes(x)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.resolve().fake_quantize(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chosen={self.kind}"
