"""Padding-free causal-LM NLL: the real tokens of a right-padded batch run as one packed row.

data.collate right-pads a batch to its longest text; on StereoSet batches of 8 about 45 % of the
positions are padding, and HF's `model(labels=...).loss` runs the body, the output head and a
[batch, length, vocab] log-softmax on all of them. Here the texts are concatenated into one row
of T real tokens, with position ids restarting at each text and a block-diagonal causal 4D mask
(each token sees only the earlier tokens of its own text). A text's last token is left out (it
predicts nothing and no earlier token sees it), the output head runs only on positions that
have a label, and the loss (TokenNLL) makes fewer vocabulary-wide passes than cross_entropy.
The loss is the same quantity — the mean of -log p(next token) over
every labelled next token — up to float rounding (other matrix shapes).

Whether a model honours position ids and 4D masks is checked once per model, on its first
batch, against the padded loss (without gradients); a model that disagrees keeps the padded path,
and so does a model with active dropout (its random masks depend on the shapes).
"""

from __future__ import annotations

import warnings
import weakref

import torch

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> packed path agrees with padded
_TOLERANCE = 1e-4  # relative: float rounding of other shapes is ~1e-6; a wrong mask or position is >1e-2


def padded_nll(model, batch) -> torch.Tensor:
    """HF's own loss on the right-padded batch (labels are -100 on padding)."""
    return model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                 labels=batch["labels"].to(model.device)).loss


def _pack(batch, device, eager: bool, dtype):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    lengths = mask.sum(1).tolist()
    if not all(bool(mask[b, :n].all()) for b, n in enumerate(lengths)):
        return None  # not right-padded: leave it to the padded path
    # A text's last token predicts nothing, and under causal attention no earlier token sees it:
    # it is left out of the row (exactly the same loss, ~7 % fewer positions on batches of 8).
    inputs = [max(n - 1, 0) for n in lengths]
    tokens = torch.cat([ids[b, :n] for b, n in enumerate(inputs)])
    pos = torch.cat([torch.arange(n) for n in inputs])
    seq = torch.cat([torch.full((n,), b) for b, n in enumerate(inputs)])
    target = torch.cat([labels[b, 1: n + 1] for b, n in enumerate(inputs)])  # position (b, t) predicts token t + 1
    t = len(tokens)
    seen = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    seen = seen[None, None].to(device)  # [1, 1, T, T]
    if eager:  # eager attention adds its mask to the scores
        seen = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
    keep = (target != -100).to(device)
    return tokens[None].to(device), pos[None].to(device), seen, keep, target[target != -100].to(device), t


def packed_nll(model, batch) -> torch.Tensor | None:
    """Mean next-token NLL over the labelled tokens, without padding; None if it cannot pack."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        return None  # flash attention ignores a custom 4D mask
    param = next(model.parameters())
    packed = _pack(batch, param.device, impl == "eager", param.dtype)
    if packed is None:
        return None
    tokens, pos, seen, keep, targets, t = packed
    window = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "sliding_window", None)
    if t == 0 or window and t > window or not keep.any():
        return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    hook = None  # every position is labelled (the usual case, last tokens being left out): no gather
    if not bool(keep.all()):
        hook = head.register_forward_pre_hook(lambda _m, args: (args[0][:, keep], *args[1:]))
    try:  # the output head runs on labelled positions only: [1, K, hidden] -> [1, K, vocab]
        logits = model(input_ids=tokens, attention_mask=seen, position_ids=pos, use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    if logits.shape[-2] != len(targets):
        return None
    return TokenNLL.apply(logits.reshape(-1, logits.shape[-1]).float(), targets)


class TokenNLL(torch.autograd.Function):
    """mean(logsumexp(z) - z[target]) over rows of logits z: F.cross_entropy's value, in fewer
    passes over the [tokens, vocab] logits. Forward keeps the logits (they exist anyway) instead of
    writing a log-softmax copy; backward writes softmax(z) - onehot once, where cross_entropy
    writes zeros, scatters, and runs log_softmax's backward over two more vocabulary-wide tensors."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - logits.gather(1, targets[:, None])[:, 0]).double().mean().to(logits.dtype)  # summed in float64

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        g = torch.sub(logits, lse[:, None]).exp_()  # softmax
        g[torch.arange(len(targets), device=g.device), targets] -= 1
        return g.mul_(grad / len(targets)), None


def _dropout(model) -> bool:
    """Active dropout draws other random masks for other shapes: then padded only (and the check
    below would draw extra numbers, so a resumed run would no longer replay the same masks)."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return any(isinstance(v, float) and v > 0 for k, v in vars(cfg).items() if k.endswith(("dropout", "pdrop")))


def token_nll(model, batch) -> torch.Tensor:
    """Mean next-token NLL over the real tokens, padding-free where the model allows it."""
    key = getattr(model, "_model", model)  # the loop's DDP proxy: the bare model decides
    ok = _CHECKED.get(key)
    if ok is False or _dropout(key):
        return padded_nll(model, batch)
    try:
        loss = packed_nll(model, batch)
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError, NotImplementedError):
        loss = None
    if ok is None and loss is not None:
        with torch.no_grad():
            ref = padded_nll(model, batch)
        ok = bool(torch.isclose(loss.detach().float(), ref.float(), rtol=_TOLERANCE, atol=1e-6))
        _CHECKED[key] = ok
        if not ok:
            warnings.warn(f"padding-free batches disagree with padded ones for {type(key).__name__} "
                          f"({loss.item():.6f} vs {ref.item():.6f}); training with padding", stacklevel=2)
            return padded_nll(model, batch)
    return loss if loss is not None else padded_nll(model, batch)
