"""Benchmark: does a forgetting patch forget what it should, on data it never saw, and keep the rest?

Run after building the patches (any subset):
    unpatch build recipes/harmful.yaml --out /tmp/harmful
    unpatch build recipes/copyright.yaml --out /tmp/copyright \
        --set data.forget.source=/work/shared/data/gutenberg/pg11_alice_in_wonderland.txt
    python bench/forget_sweep.py --harmful /tmp/harmful --copyright /tmp/copyright --scales 0.5,1

The real SmolLM2-135M is loaded ONCE; each patch is applied at each scale with `Applied`, measured,
and reverted (bit-exact, checked) before the next. Scale 0 = the base model. Prints `name: value`
lines; `#` lines are context.

Every figure is a token-weighted mean NLL (nats per token) = log perplexity, over texts encoded as
the build encodes them (`data.encode`, the recipe's max_length), right-padded, masked.
harmful (splits follow the recipe's `limit`s: it learns from the first N, the rest is held out):
  forget_heldout_nll   toxicity texts [N:]            (should go UP)
  forget_train_nll     toxicity texts [:N][:100]       (learnt from)
  retain_heldout_ppl   TruthfulQA "Q: .. A: .." [M:]  (should move <= 5 %)
  normal_ppl           WikiText-2 raw test, first 100 passages of 64 words (never used by any recipe)
copyright (book cut into the recipe's chunk_words passages; the first N are learnt):
  book_train_nll / book_heldout_nll   passages [:N] / [N:] of the same book
  other_book_nll                      the first 200 passages of --other-book (should stay)
  normal_ppl                          as above
`*_change_pct` lines compare with scale 0.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import yaml

from unpatch.batches import collate, encode
from unpatch.model import load_model
from unpatch.patch.apply import Applied
from unpatch.patch.store import load_patch
from unpatch.sources import load_texts

SHARED = Path("/work/shared/data")  # benchmark inputs only: the product never reads it
WIKI = SHARED / "wikitext2/wikitext-2-raw.test.hf-join2nl.crlf.txt"


@torch.inference_mode()
def mean_nll(model, tok, texts: list[str], max_length: int, batch_size: int = 16) -> float:
    """Token-weighted mean next-token NLL over `texts` (sorted by length: little padding)."""
    seqs = sorted(encode(texts, tok, max_length), key=len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    for k in range(0, len(seqs), batch_size):
        b = collate(seqs[k: k + batch_size], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total += float(ce)
        count += int((labels != -100).sum())
    return total / count


def normal_texts(n: int = 100, words: int = 64) -> list[str]:
    """General text no recipe trains on: the first n 64-word passages of WikiText-2 (raw) test."""
    return load_texts({"source": str(WIKI), "chunk_words": words, "limit": n})


def recipe_of(patch) -> dict:
    return yaml.safe_load(patch.recipe_text or "{}")


def limit_of(recipe: dict, role: str) -> int:
    src = recipe["data"][role]
    return src.get("limit") if isinstance(src, dict) else None


def harmful_sets(patch) -> tuple[dict[str, list[str]], int]:
    r = recipe_of(patch)
    n, m = limit_of(r, "forget"), limit_of(r, "retain")
    tox, tqa = load_texts("builtin:toxicity"), load_texts("builtin:truthfulqa")
    sets = {"forget_heldout": tox[n:], "forget_train": tox[:n][:100], "retain_heldout": tqa[m:],
            "normal": normal_texts()}
    return sets, r.get("train", {}).get("max_length", 128)


def copyright_sets(patch, book: Path, other: Path) -> tuple[dict[str, list[str]], int]:
    r = recipe_of(patch)
    src = r["data"]["forget"]
    n, words = src.get("limit"), src.get("chunk_words")
    passages = load_texts({"source": str(book), "chunk_words": words})
    sets = {"book_train": passages[:n], "book_heldout": passages[n:],
            "other_book": load_texts({"source": str(other), "chunk_words": words, "limit": 200}),
            "normal": normal_texts()}
    return sets, r.get("train", {}).get("max_length", 128)


def sweep(label: str, model, tok, patch, sets: dict[str, list[str]], max_length: int, scales: list[float]) -> None:
    print(f"# {label}: {patch.path}  sizes: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    applied = Applied(model)
    base: dict[str, float] = {}
    for scale in [0.0, *scales]:
        t = time.perf_counter()
        if scale:
            applied.apply(patch, scale)
        for name, texts in sets.items():
            nll = mean_nll(model, tok, texts, max_length)
            key = f"{label}.scale_{scale:g}.{name}"
            if name.startswith(("retain", "normal")):  # perplexity is what "moves by <= 5 %" is about
                val, unit = math.exp(nll), "ppl"
            else:
                val, unit = nll, "nll"
            print(f"{key}_{unit}: {val:.4f}")
            if scale:
                print(f"{key}_{unit}_change_pct: {100 * (val / base[name] - 1):+.2f}")
            else:
                base[name] = val
        if scale:
            print(f"{label}.scale_{scale:g}.revert_verified: {applied.revert()}")
        print(f"# {label} scale {scale:g}: {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--harmful", type=Path, help="patch built from recipes/harmful.yaml")
    ap.add_argument("--copyright", type=Path, help="patch built from recipes/copyright.yaml")
    ap.add_argument("--book", type=Path, default=SHARED / "gutenberg/pg11_alice_in_wonderland.txt", help="the book the copyright patch forgot")
    ap.add_argument("--other-book", type=Path, default=SHARED / "gutenberg/pg1342_pride_and_prejudice.txt", help="a control book")
    ap.add_argument("--scales", default="0.5,1", help="comma-separated scales besides 0 (the base)")
    args = ap.parse_args()
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    model, tok, _ = load_model("smollm2-135m", "cpu")
    if args.harmful:
        patch = load_patch(args.harmful)
        sets, max_length = harmful_sets(patch)
        sweep("harmful", model, tok, patch, sets, max_length, scales)
    if args.copyright:
        patch = load_patch(args.copyright)
        sets, max_length = copyright_sets(patch, args.book, args.other_book)
        sweep("copyright", model, tok, patch, sets, max_length, scales)


if __name__ == "__main__":
    main()
