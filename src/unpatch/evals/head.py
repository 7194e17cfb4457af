"""Log-probabilities of chosen next tokens without the [positions, vocab] logits.

A metric that scores text needs, per scored position, log_softmax(logits)[target] =
logits[target] - logsumexp(logits). The usual way writes the whole logits tensor (for SmolLM2,
1,024 positions x 49,152 tokens = 201 MB, fresh pages every pass), copies the scored rows out and
runs log_softmax over them. Here the hidden states are caught at the output head's input and the
head is run in vocabulary blocks instead: each block's logits (rows x VOCAB_BLOCK) stay in cache
while their logsumexp and any target logits in the block are read off. On SmolLM2-135M (2 cores)
the head with its log-softmax takes ~190 ms per 1,024 positions this way, against ~270 ms.

It applies only where the logits *are* the head's output: `plain_head` checks that on the model
itself (a probe forward pass), so a model that scales, caps or otherwise transforms its logits
after the head keeps the usual path. The numbers equal log_softmax's up to float rounding.
"""

from __future__ import annotations

import contextlib

import torch

from ..cpu_linear import linear, onednn_enabled

VOCAB_BLOCK = 2048  # logits columns per block: 1,024 rows x 2,048 x 4 B = 8 MB, cache-resident
ROW_BLOCK = 1024  # rows per block: enough for the head GEMM to run at full speed


class _Caught(Exception):
    """Raised by the head's pre-hook to stop the forward pass with the head's input in hand."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("output head input caught")
        self.hidden = hidden


def plain_head(model) -> torch.nn.Linear | None:
    """The model's output head if its logits are exactly `head(last hidden state)`, else None.

    Checked by running the model on a 3-token probe and comparing its logits with the head's own
    output bit for bit (logits upcast to float32 included: target_logprobs reduces in float32
    anyway); a logit scale, a soft cap or a reshape after the head fails the check.
    Needs the model in eval mode (as the scorers run it), so dropout draws nothing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(head) is not torch.nn.Linear or head.weight.device.type == "meta" or head._forward_hooks
            or head._forward_pre_hooks or "forward" in vars(head) or hasattr(head, "_hf_hook")):
        return None  # offloaded, hooked or re-wired heads (accelerate), and any other module, keep the usual path
    seen = []
    hook = head.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        probe = torch.zeros((1, 3), dtype=torch.long, device=head.weight.device)  # token 0 exists in every vocabulary
        logits = model(input_ids=probe, use_cache=False).logits
    except Exception:  # noqa: BLE001 - any model that cannot run the probe keeps the usual path
        return None
    finally:
        hook.remove()
    if len(seen) != 1 or logits.dtype not in (seen[0].dtype, torch.float32):
        return None
    return head if torch.equal(logits, seen[0].to(logits.dtype)) else None  # an upcast to float32 is exact


@contextlib.contextmanager
def head_input(head: torch.nn.Linear, keep: torch.Tensor | None):
    """Inside the block, a forward pass stops at `head` and raises _Caught with the head's input,
    flattened to [positions, hidden] and cut to the positions where `keep` (a bool mask over the
    leading dims) is True. The head's GEMM is never run."""

    def catch(_module, args):
        x = args[0]
        raise _Caught(x[keep] if keep is not None else x.reshape(-1, x.shape[-1]))

    hook = head.register_forward_pre_hook(catch)
    try:
        yield
    finally:
        hook.remove()


def run_to_head(model, head: torch.nn.Linear, keep: torch.Tensor | None, **inputs) -> torch.Tensor:
    """The head's input (see head_input) for one forward pass of `model` on `inputs`."""
    with head_input(head, keep):
        try:
            model(**inputs)
        except _Caught as caught:
            return caught.hidden
    raise RuntimeError(f"{type(model).__name__} never called its output head")


@torch.no_grad()
def target_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 log_softmax(head(hidden[rows[i]]))[targets[i]] for every i, the head run in blocks.

    hidden [n, d] in the head's dtype; rows, targets [k] long. Logits are computed in the head's
    dtype (as the model would; float32 on the CPU through oneDNN, see cpu_linear) and reduced in
    float32."""
    hidden = hidden.to(head.weight.device)
    rows, targets = rows.to(hidden.device), targets.to(hidden.device)
    weight, bias = head.weight, head.bias
    vocab = weight.shape[0]
    onednn = onednn_enabled()
    lse = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    picked = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
    by_target = torch.argsort(targets)  # wanted pairs grouped by vocabulary block
    sorted_t = targets[by_target]
    edges = torch.searchsorted(sorted_t, torch.arange(0, vocab + VOCAB_BLOCK, VOCAB_BLOCK, device=hidden.device)).tolist()
    for r0 in range(0, len(hidden), ROW_BLOCK):
        h = hidden[r0: r0 + ROW_BLOCK]
        mine = (rows >= r0) & (rows < r0 + len(h))
        parts = []
        for b, v0 in enumerate(range(0, vocab, VOCAB_BLOCK)):
            w = weight[v0: v0 + VOCAB_BLOCK]
            z = linear(h, w, None if bias is None else bias[v0: v0 + len(w)], onednn=onednn)
            sel = by_target[edges[b]: edges[b + 1]]
            sel = sel[mine[sel]]
            if len(sel):  # this block's target logits, read before z is overwritten below
                picked[sel] = z[rows[sel] - r0, targets[sel] - v0].float()
            zf = z if z.dtype == torch.float32 else z.float()
            top = zf.amax(1, keepdim=True)
            parts.append(zf.sub_(top).exp_().sum(1).log_().add_(top[:, 0]))
        lse[r0: r0 + len(h)] = torch.logsumexp(torch.stack(parts, 1), 1)
    return picked - lse[rows]


def kept_logprobs(model, head: torch.nn.Linear, keep: torch.Tensor, targets: torch.Tensor, **inputs) -> torch.Tensor:
    """float32 log-probs of `targets` at the positions where `keep` is True (row-major order), for
    one forward pass of `model` on `inputs`: target i is predicted at the i-th kept position."""
    return target_logprobs(run_to_head(model, head, keep, **inputs), head, torch.arange(len(targets)), targets)
