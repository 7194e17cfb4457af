"""Putting a model into a mode for a block of work: evaluating(model) scores or generates in eval
mode (dropout off) and gives the model back in the mode it came in, as every metric and the
reference passes of the methods need; the C heap keeps freed memory for the next pass meanwhile
(`heap.steady_heap`) and float32 CPU linear layers run through oneDNN (`cpu_linear`)."""

from __future__ import annotations

import contextlib

from .cpu_linear import fast_linears
from .heap import steady_heap


@contextlib.contextmanager
def evaluating(model, *, onednn: bool = True):
    """model.eval() for the block; afterwards (also after an error) model.train(as it was).
    `onednn`: float32 CPU linear layers run through oneDNN meanwhile (cpu_linear.fast_linears)."""
    was_training = model.training
    model.eval()
    try:
        with steady_heap(), (fast_linears(model) if onednn else contextlib.nullcontext()):
            yield model
    finally:
        model.train(was_training)
