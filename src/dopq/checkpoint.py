"""Reconstruction checkpoints: a long ``--reconstruct`` run that is stopped goes on where it stopped,
with the result an uninterrupted run gives.

One file, ``DIR/reconstruction.ckpt``, rewritten after calibration and after every reconstructed
unit: the quantized model's state, the reconstruction's progress (:class:`ReconstructionProgress`:
the finished units' statistics and the two random streams the remaining units draw from), the
report of the stages before reconstruction, and what identifies the run (its resolved arguments,
the dopq and torch versions, the weights file's SHA-256). Each write goes to a temporary file that
is flushed to disk and then renamed over the previous one, so a crash mid-write leaves the previous
checkpoint whole. The file starts with a magic line, the SHA-256 of everything after it and a
one-line JSON summary; a file whose digest does not match (truncated, corrupt) is refused, never
read in part.

Layout::

    dopq-reconstruction-checkpoint 1\\n
    <sha256 hex of the rest>\\n
    <summary JSON>\\n
    <torch.save payload: plain types and tensors, loaded with weights_only=True>
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import dopq
from dopq import distributed
from dopq.errors import CheckpointError
from dopq.files import atomic_path
from dopq.quantizers import TanQQuantizer, UniformQuantizer
from dopq.reconstruct import ReconstructionProgress
from dopq.serialize import granularities, match_state

__all__ = [
    "FILE_NAME",
    "Interrupted",
    "ReconstructionCheckpoint",
    "RunIdentity",
    "SavedRun",
    "describe",
    "read_checkpoint",
    "restore_model",
]

FILE_NAME = "reconstruction.ckpt"
MAGIC = b"dopq-reconstruction-checkpoint 1\n"
FORMAT = "dopq-reconstruction-checkpoint"
SCHEMA = 1


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised as an exception, like SIGINT's ``KeyboardInterrupt``: the
    unit in progress is dropped, the checkpoint of the last finished one stays."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must have been written with to be resumed.

    Args:
        arguments: the resolved arguments that shape the quantized model (JSON-ready).
        weights_sha256: SHA-256 of the weights file the float model came from (None: no file).
        dopq_version: the dopq that writes or resumes.
        torch_version: the torch that writes or resumes (float kernels differ between versions).
    """

    arguments: dict[str, Any]
    weights_sha256: str | None = None
    dopq_version: str = field(default_factory=lambda: dopq.__version__)  # read once dopq is imported
    torch_version: str = str(torch.__version__)  # a plain str: weights_only loading refuses TorchVersion

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, sort_keys=True, default=str)


@dataclass
class SavedRun:
    """A checkpoint's contents: the model's state and how to go on from it.

    ``progress`` is None right after calibration (no unit reconstructed yet).
    """

    state: dict[str, torch.Tensor]
    granularity: dict[str, int | None]
    learned: list[str]
    stages: dict[str, Any]
    progress: ReconstructionProgress | None
    summary: dict[str, Any] = field(default_factory=dict)
    digest: str = ""


def _learned_quantizers(model: nn.Module) -> list[str]:
    """Quantizers whose step sizes or level parameters reconstruction made parameters (they then
    sit among a module's parameters, not its buffers: the state's key order follows that)."""
    learned_uniform = (UniformQuantizer, "scale")
    learned_tanq = (TanQQuantizer, "sharpness")
    return [
        name
        for name, q in model.named_modules()
        for cls, attr in (learned_uniform, learned_tanq)
        if isinstance(q, cls) and isinstance(getattr(q, attr), nn.Parameter)
    ]


def _make_learned(model: nn.Module, names: list[str], where: Path) -> None:
    modules = dict(model.named_modules())
    for name in names:
        q = modules.get(name)
        if isinstance(q, UniformQuantizer):
            q.make_scale_learnable().requires_grad_(False)  # frozen, as reconstruction leaves it
        elif isinstance(q, TanQQuantizer):
            for p in q.make_learnable():
                p.requires_grad_(False)
        else:
            raise CheckpointError(f"checkpoint {where} does not match the model: no quantizer {name}")


def restore_model(model: nn.Module, saved: SavedRun, where: Path | str = FILE_NAME) -> None:
    """Put a checkpoint's state into a freshly prepared ``model`` (``prepare_model`` with the same
    recipe), in place: the model is then the one the checkpointed run held."""
    where = Path(where)
    match_state(model, saved.granularity, saved.state)
    _make_learned(model, saved.learned, where)
    try:
        model.load_state_dict(saved.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {where} does not match the model: {first}") from None
    if list(model.state_dict()) != list(saved.state):  # the order a later --save writes
        raise CheckpointError(f"checkpoint {where} does not match the model: its state is in another order")


# --------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------


def _encode(summary: dict[str, Any], payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    rest = json.dumps(summary, sort_keys=True).encode() + b"\n" + buffer.getvalue()
    return MAGIC + hashlib.sha256(rest).hexdigest().encode() + b"\n" + rest


def _split(data: bytes, path: Path) -> tuple[str, dict[str, Any], bytes]:
    """The digest, the summary and the payload bytes of a checkpoint file's ``data``."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({why}); delete it to start the run over"
        )

    if not data.startswith(MAGIC):
        raise corrupt("no dopq checkpoint header")
    digest, _, rest = data[len(MAGIC) :].partition(b"\n")
    if len(digest) != 64 or hashlib.sha256(rest).hexdigest().encode() != digest:
        raise corrupt("its SHA-256 does not match its contents")
    line, _, body = rest.partition(b"\n")
    try:
        summary = json.loads(line)
    except ValueError:
        raise corrupt("unreadable summary") from None
    return digest.decode(), summary, body


def read_checkpoint(path: str | Path) -> SavedRun:
    """Read and verify a checkpoint file (digest and format; not whom it was written for).

    Raises:
        CheckpointError: a missing, truncated, corrupt or foreign file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    digest, summary, body = _split(data, path)
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # the digest matched: a file another program wrote in this format
        raise CheckpointError(f"checkpoint {path} is not readable ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("schema") != SCHEMA:
        raise CheckpointError(f"checkpoint {path} is not a dopq reconstruction checkpoint of schema {SCHEMA}")
    progress = payload["progress"]
    return SavedRun(
        state=payload["state_dict"],
        granularity=payload["granularity"],
        learned=list(payload["learned"]),
        stages=payload["stages"],
        progress=None if progress is None else ReconstructionProgress(**progress),
        summary={**summary, "identity": payload["identity"]},
        digest=digest,
    )


def _summary_of(path: Path) -> dict[str, Any] | None:
    """The summary line of a checkpoint, unverified (for messages only)."""
    try:
        with path.open("rb") as f:
            head = [f.readline() for _ in range(3)]
        return json.loads(head[2]) if head[0] == MAGIC else None
    except (OSError, ValueError, IndexError):
        return None


def _holds(summary: dict[str, Any]) -> str:
    done, total = summary["units_done"], summary["units_total"]
    if done == 0:
        return "the calibrated model, no unit reconstructed yet"
    return f"units 1-{done} of {total} reconstructed (last: {summary['last_unit']})"


def describe(directory: str | Path) -> str:
    """What ``directory``'s checkpoint holds, in words (for messages)."""
    summary = _summary_of(Path(directory) / FILE_NAME)
    if summary is None:
        return f"{directory} holds no checkpoint yet"
    return f"the checkpoint in {directory} holds {_holds(summary)}"


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} here")
    return out


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ReconstructionCheckpoint:
    """The checkpoint of one run in ``directory``: :meth:`load` to resume, :meth:`write` as it goes.

    Args:
        directory: where ``reconstruction.ckpt`` is kept.
        identity: the run's arguments and versions; a checkpoint written with others is refused.
        resume: the user asked to resume (``--resume``): a missing checkpoint is an error. Without
            it a checkpoint found in ``directory`` is resumed all the same.
        progress_lines: print one line per written checkpoint (process 0 only).

    Example:
        >>> import tempfile
        >>> ckpt = ReconstructionCheckpoint(tempfile.mkdtemp(), RunIdentity({"w_bits": 4}))
        >>> ckpt.load() is None  # nothing written yet: start from the beginning
        True
    """

    def __init__(
        self,
        directory: str | Path,
        identity: RunIdentity,
        resume: bool = False,
        progress_lines: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.resume = resume
        self.progress_lines = progress_lines
        self._loaded: tuple[SavedRun | None] | None = None

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    def load(self) -> SavedRun | None:
        """The checkpoint to resume from, verified against this run; None to start afresh. Read
        once: a caller may load early to refuse a wrong checkpoint before any long work.

        Raises:
            CheckpointError: ``resume`` without a checkpoint; a truncated or corrupt file; one
                written by other arguments, another dopq or torch, or for other weights.
        """
        if self._loaded is None:
            self._loaded = (self._read(),)
        return self._loaded[0]

    def _read(self) -> SavedRun | None:
        # process 0 reads and the others take what it read (or its refusal): it alone writes the
        # checkpoint, and under torchrun the others may run on machines without its folder
        found: SavedRun | str | None = None
        if distributed.current().is_main:
            try:
                found = self._read_here()
            except CheckpointError as exc:
                found = str(exc)
        found = distributed.broadcast_object(found)
        if isinstance(found, str):
            raise CheckpointError(found)
        return found

    def _read_here(self) -> SavedRun | None:
        for stale in self.directory.glob(f".{FILE_NAME}.*.tmp"):  # what a write killed mid-way left
            stale.unlink(missing_ok=True)
        if not self.path.is_file():
            if self.resume:
                raise CheckpointError(f"--resume: {self.directory} holds no checkpoint ({FILE_NAME})")
            return None
        saved = read_checkpoint(self.path)
        self._check_identity(saved.summary["identity"])
        return saved

    def _check_identity(self, saved: dict[str, Any]) -> None:
        me, where = self.identity, self.path
        hint = "resume with the command that wrote it, or use another --checkpoint-dir"
        for what, key, mine in (("dopq", "dopq_version", me.dopq_version), ("torch", "torch_version",
                                me.torch_version)):  # fmt: skip
            if saved[key] != mine:
                raise CheckpointError(
                    f"checkpoint {where} was written by {what} {saved[key]}, this is {what} {mine}; {hint}"
                )
        if saved["weights_sha256"] != me.weights_sha256:
            raise CheckpointError(
                f"checkpoint {where} was written for weights with SHA-256 {saved['weights_sha256']}, "
                f"--checkpoint now has {me.weights_sha256}; {hint}"
            )
        if saved["arguments"] != me.arguments_json():
            diff = _differences(json.loads(saved["arguments"]), json.loads(me.arguments_json()))
            raise CheckpointError(
                f"checkpoint {where} was written by other arguments ({'; '.join(diff[:3])}); {hint}"
            )

    def write(
        self,
        model: nn.Module,
        stages: dict[str, Any],
        progress: ReconstructionProgress | None,
        total_units: int,
    ) -> None:
        """Replace the checkpoint with ``model``'s state and ``progress`` (None: just calibrated),
        atomically; only process 0 writes (every process holds the same model)."""
        if not distributed.current().is_main:
            return
        done = 0 if progress is None else progress.done
        summary = {
            "units_done": done,
            "units_total": total_units,
            "last_unit": progress.names[done - 1] if progress is not None and done else None,
        }
        payload = {
            "format": FORMAT,
            "schema": SCHEMA,
            "identity": {
                "arguments": self.identity.arguments_json(),
                "weights_sha256": self.identity.weights_sha256,
                "dopq_version": self.identity.dopq_version,
                "torch_version": self.identity.torch_version,
            },
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "granularity": granularities(model),
            "learned": _learned_quantizers(model),
            "stages": stages,
            "progress": None if progress is None else _progress_dict(progress),
        }
        data = _encode(summary, payload)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, tmp.open("wb") as f:  # the file closes, then the rename
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        _sync_directory(self.directory)
        if self.progress_lines:
            tqdm.write(self._line(summary, progress), file=sys.stderr)

    def _line(self, summary: dict[str, Any], progress: ReconstructionProgress | None) -> str:
        if progress is None or not progress.done:
            return f"dopq: calibrated; checkpoint {self.path} holds {_holds(summary)}"
        done, total = progress.done, progress.total
        last = progress.units[-1]
        left = progress.seconds / done * (total - done)
        return (
            f"dopq: reconstructed {done}/{total} units ({last['unit']} in {last['seconds']:.1f} s, "
            f"{progress.seconds:.0f} s so far, about {left:.0f} s left); checkpoint {self.path} "
            f"holds {_holds(summary)}"
        )


def _progress_dict(progress: ReconstructionProgress) -> dict[str, Any]:
    return {
        "done": progress.done,
        "names": list(progress.names),
        "units": [dict(u) for u in progress.units],
        "batch_rng": progress.batch_rng.clone(),
        "drop_rng": progress.drop_rng.clone(),
        "seconds": progress.seconds,
    }
