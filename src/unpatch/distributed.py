"""One build on many processes (`torchrun`, `accelerate launch`), and the one-process default.

Why a module of its own: the loop and the build both ask "am I rank 0, how many are we, how do I
reduce", and a plain one-process build must not be changed by any of it: without a launcher there
is no Accelerator and the loop runs the very code it always ran, so CPU builds stay bit-identical.

How an optimizer step is shared so the result equals the one-process build (up to the fp32
summation order of the gradient all-reduce):
- a step is `grad_accum` micro-batches; micro-batch i is a pure function of (seed, i)
  (data.Batches), so every rank computes the batches it needs itself, no data loader or scatter;
- "rows": a plain token batch of a data.Batches (exactly input_ids / attention_mask / labels, the
  loss a mean over its labelled tokens: ga, task_vector, masked_ga on marked words; the loop's
  `split_rows` says so or not) is cut into contiguous,
  disjoint row slices, `chunks` per rank; a slice's loss is weighted by its share of the batch's
  labelled tokens, so sum(share * slice mean) is the batch's token mean exactly. The global batch
  stays `batch_size`; the same cut, on one process, is the memory-aware micro-batching;
- "micro": any other batch (pairs, several streams: pcgu, npo, ga_kl, masked_ga on pairs) has a
  loss whose normaliser the loop cannot see, so ranks take whole micro-batches in turn
  (micro a goes to rank a % world); that needs grad_accum to be a multiple of the world size;
- DDP averages the gradients over ranks, so each piece's loss is scaled by share * world / grad_accum.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnpatchError

PLAIN_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


@dataclass(frozen=True)
class Piece:
    """What one backward pass of a rank covers: micro-batch `micro` of the step, row slice `part`
    of `parts` equal slices (parts == 1: the whole micro-batch)."""

    micro: int
    part: int = 0
    parts: int = 1


def splittable(batch: Any) -> bool:
    """A plain token batch, whose loss is a mean over its labelled tokens (see the module doc)."""
    return isinstance(batch, dict) and set(batch) == PLAIN_KEYS and all(isinstance(v, torch.Tensor) for v in batch.values())


def schedule(grad_accum: int, world: int, rank: int, rows: int, can_split: bool, chunks: int = 1,
             method: str = "this method") -> list[Piece]:
    """This rank's pieces of every step (the same for each step). `chunks` > 1 cuts each rank's
    share of a micro-batch further, to fit memory; it applies to splittable batches only."""
    if world == 1 and (chunks == 1 or not can_split):
        return [Piece(a) for a in range(grad_accum)]  # the classic loop, unchanged
    if can_split:
        if rows < world:
            raise UnpatchError(f"train.batch_size: {rows} rows cannot be shared by {world} processes; use a batch_size of at least {world}")
        chunks = max(1, min(chunks, rows // world))  # every piece keeps at least one row
        return [Piece(a, rank * chunks + j, world * chunks) for a in range(grad_accum) for j in range(chunks)]
    if grad_accum % world:
        raise UnpatchError(f"train.grad_accum: method {method}'s batches cannot be split by rows, so {world} processes take whole "
                           f"micro-batches; set train.grad_accum to a multiple of {world} (and divide train.batch_size to keep the step)")
    return [Piece(a) for a in range(rank, grad_accum, world)]


def take(batch: Any, piece: Piece) -> tuple[Any, float]:
    """(the piece's rows of a micro-batch, its share of the micro-batch's labelled tokens)."""
    if piece.parts == 1:
        return batch, 1.0
    rows = batch["input_ids"].shape[0]
    bounds = [len(s) for s in torch.arange(rows).tensor_split(piece.parts)]
    lo = sum(bounds[: piece.part])
    hi = lo + bounds[piece.part]
    part = {k: v[lo:hi] for k, v in batch.items()}
    total = int((batch["labels"][:, 1:] != -100).sum())  # the tokens a causal-LM loss scores
    mine = int((part["labels"][:, 1:] != -100).sum())
    return part, (mine / total if total else (hi - lo) / rows)


# ------------------------------------------------------------------------------ the engine


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process, or under DeepSpeed/FSDP."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")) > 1 or any(
        env.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))


class Engine:
    """The process group as the build sees it. `accelerator` is None in a plain one-process run."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        dt = str(accelerator.distributed_type).rsplit(".", 1)[-1].lower() if accelerator else "no"
        self._pieces = 1  # backward passes per optimizer step on this rank (set by wrap)
        self.kind = "deepspeed" if "deepspeed" in dt else "fsdp" if "fsdp" in dt else "ddp" if self.world > 1 else "single"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP / DeepSpeed own the parameters: the trained state must be gathered to be read."""
        return self.kind in ("fsdp", "deepspeed")

    def describe(self) -> str:
        a = self.accelerator
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        return (f"unpatch: rank {self.rank}/{self.world} on {a.device if a else 'local'}; world size {self.world} "
                f"({self.kind}, {backend} backend)")

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)  # every rank: a launcher prefixes its rank

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (float64: metrics must agree on every rank, e.g. for early stop)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def wrap(self, model, opt, pieces: int = 1):
        """(handle to run forward/backward through, optimizer) — DDP / FSDP / DeepSpeed wrapping.
        `pieces`: backward passes per optimizer step on this rank."""
        self._pieces = pieces
        if self.accelerator is None or self.world == 1 and not self.sharded:
            return model, opt
        if self.kind == "deepspeed":
            # DeepSpeed's engine steps the optimizer itself, every `gradient_accumulation_steps`
            # backward passes, and divides each loss by that number (undone in backward())
            self.accelerator.gradient_accumulation_steps = pieces
        if self.sharded:  # they shard parameters and optimizer state together
            return self.accelerator.prepare(model, opt)
        return self.accelerator.prepare(model), opt  # DDP: the optimizer may hold fp32 masters

    def backward(self, loss: torch.Tensor, handle, sync: bool) -> None:
        """Backward; DDP all-reduces only on the step's last piece (`sync`), as no_sync intends."""
        if self.accelerator is None:
            loss.backward()
        elif self.kind == "deepspeed":
            self.accelerator.backward(loss * self._pieces)
        elif sync or self.sharded:
            self.accelerator.backward(loss)
        else:
            with self.accelerator.no_sync(handle):
                self.accelerator.backward(loss)

    def clip(self, params, max_norm: float) -> None:
        if self.accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)  # DeepSpeed clips in its engine (its config)

    def full_state(self, handle) -> dict[str, torch.Tensor] | None:
        """Under FSDP / DeepSpeed, the gathered state dict (a collective: every rank calls it)."""
        return self.accelerator.get_state_dict(handle) if self.sharded else None


_ENGINE: Engine | None = None


def engine(device: str = "auto") -> Engine:
    """The process's engine, made once. Under a launcher, an Accelerator (it reads the launcher's
    environment: gloo on CPU, NCCL on GPUs, or the DeepSpeed/FSDP plugin of `--config_file`)."""
    global _ENGINE
    if _ENGINE is None:
        if launched():
            try:
                from accelerate import Accelerator
                from accelerate.utils import DistributedDataParallelKwargs
            except ImportError as e:
                raise UnpatchError("a multi-process build needs the accelerate package; pip install accelerate") from e
            # buffers (rotary tables) are identical on every rank: no need to broadcast them per forward
            ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
            _ENGINE = Engine(Accelerator(cpu=device == "cpu", kwargs_handlers=[ddp]))
        else:
            _ENGINE = Engine()
    return _ENGINE


def device_for(eng: Engine, requested: str) -> str:
    """The device a rank loads the model on: its own GPU under a launcher, else as asked."""
    if eng.accelerator is not None and (requested == "auto" or requested.startswith("cuda")):
        return str(eng.accelerator.device)
    return requested


# ------------------------------------------------------------------------------ memory per micro-batch
# (the trainer cuts a micro-batch into row slices that fit; the dry run prints the same estimate)


GB = 1e9  # bytes, as the messages and the dry run print memory


def activation_bytes_per_token(config, elem: int) -> int:
    """Bytes autograd keeps per token for the backward pass (an estimate, Korthikanti et al. 2022
    style): per layer the inputs of the two norms, q/k/v/o and the MLP (~10 hidden-wide tensors)
    and the MLP's inner tensors (gate, up, act, down input: 4 intermediate-wide), in the compute
    dtype; plus the logits, their fp32 upcast and its gradient (the loss). With a frozen base (LoRA)
    the activations are needed all the same: gradients flow through every layer to the adapters."""
    h = config.hidden_size
    f = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or getattr(config, "n_inner", None) or 4 * h
    return config.num_hidden_layers * elem * (10 * h + 4 * f) + config.vocab_size * (elem + 4 + 4)


def choose_chunks(rows: int, free_bytes: int, reserved_bytes: int, per_row_bytes: int, headroom: float = 0.85) -> int:
    """Into how many row slices to cut a micro-batch of `rows` rows so one slice's activations fit
    in `free_bytes` (measured with the weights resident) less `reserved_bytes` (gradients and
    optimizer state, allocated at the first step), keeping `headroom` against fragmentation.
    The step is unchanged: the slices' gradients accumulate to the same sum."""
    budget = free_bytes * headroom - reserved_bytes
    fit = int(budget // per_row_bytes) if budget > 0 else 0
    if fit < 1:
        raise UnpatchError(f"train.max_length: one row needs ~{per_row_bytes / GB:.2f} GB of activations but ~{max(budget, 0) / GB:.2f} GB "
                           "is free; lower train.max_length, use dtype bfloat16, or shard the model (examples/ FSDP / DeepSpeed)")
    return 1 if fit >= rows else math.ceil(rows / fit)
