"""Fast full-sentence log-likelihoods for causal LMs, scored as lm-evaluation-harness scores them.

lm-eval (0.4.x, `TemplateLM.loglikelihood` + `HFLM._loglikelihood_tokens`) scores a request with
an empty context like this:
  1. the continuation is tokenized *without* special tokens: `tokenizer.encode(text, add_special_tokens=False)`;
  2. the context becomes one token, `HFLM.prefix_token_id`: the tokenizer's BOS id, else its EOS
     id (or a user-given id); if the text's first token already *is* that id, that token is the
     context and the rest is scored;
  3. the model reads (context + continuation)[:-1] (right-padded in a batch, no attention mask);
     the score is the sum over continuation tokens of log_softmax(logits)[next token].
We compute the same numbers with less work:
  - log_softmax over a few positions at a time (cache-resident) instead of over the whole
    [batch, length, vocab] logits, and no argmax;
  - texts are length-sorted, so a batch carries almost no padding;
  - shared prefixes are run once (`share_prefixes=True`, sdpa/eager attention): texts taken in
    lexicographic order are packed into rows of PACK_WIDTH positions, each row a prefix tree
    (every text starts with the same BOS; the two sentences of a CrowS pair share their start)
    with a 4D mask so a position attends to its ancestors only, and position ids = depth
    ("tree attention"). On CrowS-Pairs this runs ~27 % fewer positions than one row per text;
  - the output head (and log_softmax) runs only on scored positions: pads and shared duplicates
    never reach the [positions, vocab] matmul, which runs in vocabulary blocks (`head.py`) so the
    [positions, vocab] logits are never written.
Results differ from lm-eval's only by float rounding (~1e-6 relative; other batch shapes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ..batches import pad_id
from ..errors import UnpatchError
from ..modes import evaluating
from .head import plain_head, run_to_head, target_logprobs

PROGRESS_MIN_TEXTS = 512  # show a progress bar only for runs long enough to be worth watching


def prefix_token_id(tokenizer, prefix_token: int | None = None) -> int:
    """The token an empty context becomes: as lm-eval's `HFLM.prefix_token_id` (BOS, else EOS)."""
    if prefix_token is not None:
        return int(prefix_token)
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UnpatchError("tokenizer has neither a BOS nor an EOS token; pass prefix_token=<id> to score sentences")


def encode_for_scoring(tokenizer, texts: Sequence[str], prefix: int) -> list[list[int]]:
    """Each text as [context token, *continuation tokens], lm-eval's empty-context rule."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [ids if ids and ids[0] == prefix else [prefix, *ids] for ids in encoded]


def sentence_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 32, prefix_token: int | None = None,
                      share_prefixes: bool = True, progress: bool | None = None) -> list[float]:
    """Sum of token log-probs of each whole text given a leading BOS/EOS token, in input order.

    Equals lm-eval's `HFLM.loglikelihood([Instance(args=("", text))])[i][0]` (module docstring);
    an empty text scores 0.0 (lm-eval refuses it). Runs on the model's device in the model's
    dtype; log-probs are taken in float32 and summed in float64. `batch_size` is the number of
    texts per forward pass (with prefix sharing: as many positions as that many average texts, and at
    least MIN_POSITIONS).
    `progress=None` shows a rich bar on stderr for runs of 512 texts or more.
    """
    if batch_size < 1:
        raise UnpatchError(f"batch_size {batch_size}: must be at least 1")
    prefix = prefix_token_id(tokenizer, prefix_token)
    seqs = encode_for_scoring(tokenizer, texts, prefix)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    longest = max((len(s) - 1 for s in seqs), default=0)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and longest > limit:
        i = next(i for i, s in enumerate(seqs) if len(s) - 1 > limit)
        raise UnpatchError(f"text {i} has {len(seqs[i]) - 1} tokens, more than the model's {limit} positions; shorten it or use the perplexity metric")
    pad = pad_id(tokenizer, prefix)
    window = getattr(cfg, "sliding_window", None)
    if (window and longest > window) or getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        share_prefixes = False  # a custom 4D mask replaces sliding windows, and flash attention ignores it
    bar = _progress(len(seqs), progress)
    try:
        with torch.inference_mode(), evaluating(model):
            head = plain_head(model)
            if share_prefixes:
                try:
                    return _score_packed(model, seqs, batch_size, pad, bar, head)
                except (TypeError, ValueError, AttributeError, NotImplementedError, IndexError) as e:  # a model that rejects 4D masks
                    warnings.warn(f"prefix sharing failed for {type(model).__name__} ({e}); scoring without it", stacklevel=2)
                    if bar is not None:
                        bar.stop()
                        bar = _progress(len(seqs), True)
            return _score_plain(model, seqs, batch_size, pad, bar, head)
    finally:
        if bar is not None:
            bar.stop()


def _progress(total: int, enabled: bool | None):
    """An inner progress task (unpatch.progress): for long runs, or whenever an outer task (eval,
    sweep) is showing progress; `.stop()` ends it."""
    from .. import progress

    if enabled is False or (enabled is None and total < PROGRESS_MIN_TEXTS and not progress.active()):
        return None
    return progress.start("scoring", total, unit="tokens", log=False)


def _advance(bar, n: int, total: int) -> None:
    if bar is not None:
        bar.total = total
        bar.advance(n)


def _pick(flat: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """log_softmax(flat[idx])[targets] in float32 for flat logits [positions, vocab], a few rows at
    a time: a ~4 MB block stays in cache, ~3x faster than one log_softmax over the whole batch."""
    step = max(8, (4 << 20) // (4 * flat.shape[-1]))
    out = [torch.log_softmax(flat[idx[s: s + step]].float(), dim=-1).gather(1, targets[s: s + step, None])[:, 0]
           for s in range(0, len(idx), step)]
    return torch.cat(out).tolist() if out else []


def _score_plain(model, seqs: list[list[int]], batch_size: int, pad_id: int, bar, head=None) -> list[float]:
    """Length-sorted, right-padded batches of whole sequences (lm-eval's layout, without its waste)."""
    device = next(model.parameters()).device
    order = sorted((i for i, s in enumerate(seqs) if len(s) > 1), key=lambda i: (-len(seqs[i]), i))
    total = sum(len(s) - 1 for s in seqs)
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        width = len(seqs[idx[0]]) - 1
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        rows, cols, tgts = [], [], []
        for r, i in enumerate(idx):
            n = len(seqs[i]) - 1
            inp[r, :n] = torch.tensor(seqs[i][:-1])
            rows += [r] * n
            cols += range(n)
            tgts += seqs[i][1:]
        # no attention mask: with right padding and causal attention no real token sees a pad
        if head is not None:  # hidden states of the real positions, row by row = the order of tgts
            real = torch.arange(width)[None, :] < torch.tensor([len(seqs[i]) - 1 for i in idx])[:, None]
            hidden = run_to_head(model, head, real.to(device), input_ids=inp.to(device), use_cache=False)
            lp = target_logprobs(hidden, head, torch.arange(len(tgts)), torch.tensor(tgts)).tolist()
        else:
            logits = model(input_ids=inp.to(device), use_cache=False).logits
            flat_idx = torch.tensor(rows, device=device) * width + torch.tensor(cols, device=device)
            lp = _pick(logits.flatten(0, 1), flat_idx, torch.tensor(tgts, device=device))
        pos = 0
        for i in idx:
            n = len(seqs[i]) - 1
            out[i] = math.fsum(lp[pos: pos + n])
            pos += n
        _advance(bar, pos, total)
    return out


PACK_WIDTH = 128  # positions per packed row: attention within a row costs O(width^2)
# A forward pass of packed rows runs at least this many positions: on CPU the projections' GEMMs
# (M = positions) and the output head run ~15 % faster at M ~1000 than at M ~250 (measured on
# SmolLM2-135M, 2 threads); 2,048 or 4,096 gained nothing. The cost is memory: activations, and
# MIN_POSITIONS x vocab floats of logits for a model whose head is not plain (head.plain_head).
MIN_POSITIONS = 1024


class _Row:
    """A prefix tree of input positions, laid out as one row: node j has a token, a parent node
    (-1 for a root) and a depth (its position id); parents come before their children."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.child: dict[tuple[int, int], int] = {}

    def new_nodes(self, inputs: list[int]) -> int:
        node = -1
        for j, t in enumerate(inputs):
            node = self.child.get((node, t), -2)
            if node == -2:
                return len(inputs) - j
        return 0

    def add(self, inputs: list[int]) -> list[int]:
        node, path = -1, []
        for j, t in enumerate(inputs):
            nxt = self.child.get((node, t))
            if nxt is None:
                nxt = self.child[(node, t)] = len(self.tokens)
                self.tokens.append(t), self.parent.append(node), self.depth.append(j)
            node = nxt
            path.append(node)
        return path

    def visible(self, width: int) -> torch.Tensor:
        """[width, width] bool: node i sees node j iff j is i itself or one of its ancestors."""
        n = len(self.tokens)
        seen = torch.zeros((width, width), dtype=torch.bool)
        for j, p in enumerate(self.parent):
            if p >= 0:
                seen[j] = seen[p]
            seen[j, j] = True
        seen[range(n, width), range(n, width)] = True  # padding sees itself (no empty softmax)
        return seen


def _score_packed(model, seqs: list[list[int]], batch_size: int, pad_id: int, bar, head=None) -> list[float]:
    """Prefix-tree packing: consecutive texts (in lexicographic order) share a row, each distinct
    prefix appears once per row, and a 4D attention mask lets every position see only its own
    ancestors, with position ids = depth. Logits are computed only for positions that are scored."""
    device = next(model.parameters()).device
    order = sorted((i for i, s in enumerate(seqs) if len(s) > 1), key=lambda i: seqs[i])
    width = max([PACK_WIDTH] + [len(seqs[i]) - 1 for i in order])
    rows, where = [], {}
    for i in order:
        inputs = seqs[i][:-1]
        if not rows or len(rows[-1].tokens) + rows[-1].new_nodes(inputs) > width:
            rows.append(_Row())
        where[i] = (len(rows) - 1, rows[-1].add(inputs))
    wanted: list[dict[tuple[int, int], int]] = [{} for _ in rows]  # row -> (node, target) -> pick number
    for i, (r, path) in where.items():
        for j, node in enumerate(path):
            wanted[r].setdefault((node, seqs[i][j + 1]), len(wanted[r]))
    avg = max(1, round(sum(len(r.tokens) for r in rows) / max(1, len(where))))
    per_chunk = max(1, max(batch_size * avg, MIN_POSITIONS) // width)  # rows per forward
    by_len = sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens))
    lps: list[list[float]] = [[] for _ in rows]
    total = sum(len(r.tokens) for r in rows)
    for start in range(0, len(by_len), per_chunk):
        chunk = by_len[start: start + per_chunk]
        for r, lp in zip(chunk, _run_packed(model, [rows[r] for r in chunk], [wanted[r] for r in chunk], pad_id, device, head), strict=True):
            lps[r] = lp
        _advance(bar, sum(len(rows[r].tokens) for r in chunk), total)
    out = [0.0] * len(seqs)
    for i, (r, path) in where.items():
        out[i] = math.fsum(lps[r][wanted[r][(node, seqs[i][j + 1])]] for j, node in enumerate(path))
    return out


def _run_packed(model, rows: list[_Row], wanted: list[dict], pad_id: int, device, head=None) -> list[list[float]]:
    """One forward pass over packed rows; per row, the log-probs of its wanted (node, target)s."""
    width = max(len(r.tokens) for r in rows)
    inp = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        inp[b, : len(row.tokens)] = torch.tensor(row.tokens)
        pos[b, : len(row.tokens)] = torch.tensor(row.depth)
    seen = torch.stack([row.visible(width) for row in rows])[:, None].to(device)  # [rows, 1, width, width]
    # additive: eager attention adds its mask to the scores, and sdpa's CPU kernel runs ~15 % faster
    # on a float mask than on a bool one ([8, 9, 128, 64] queries: 1.70 vs 1.98 ms)
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    seen = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, w in enumerate(wanted):
        keep[b, [node for node, _ in w]] = True
    keep = keep.to(device)
    idx, tgt = [], []
    for b, w in enumerate(wanted):
        for node, t in w:  # dicts keep insertion order = pick numbers
            idx.append(b * width + node)
            tgt.append(t)
    idx, tgt = torch.tensor(idx, device=device), torch.tensor(tgt, device=device)
    rank = torch.cumsum(keep.flatten(), 0) - 1  # flat position -> row among the scored positions
    inputs = {"input_ids": inp.to(device), "attention_mask": seen, "position_ids": pos.to(device), "use_cache": False}
    if head is not None:  # the head runs in vocabulary blocks on the scored positions' hidden states
        lp = target_logprobs(run_to_head(model, head, keep, **inputs), head, rank[idx], tgt).tolist()
    else:
        lp = _logprobs_via_logits(model, keep, rank, idx, tgt, inputs)
    out, at = [], 0
    for w in wanted:
        out.append(lp[at: at + len(w)])
        at += len(w)
    return out


def _logprobs_via_logits(model, keep: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor, tgt: torch.Tensor, inputs: dict) -> list[float]:
    """_run_packed's log-probs for a model whose logits are not plainly its head's output."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0][keep], *args[1:])) if head is not None else None
    try:  # the output head runs on scored positions only: [scored, hidden] -> [scored, vocab]
        logits = model(**inputs).logits
    finally:
        if hook is not None:
            hook.remove()
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):  # a model that reshapes its logits: the full [rows, width, vocab]
        rank, logits = torch.arange(keep.numel(), device=keep.device), logits.flatten(0, 1)
    return _pick(logits, rank[idx], tgt)
