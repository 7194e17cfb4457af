"""`--help` text shared by every command: one or two examples each, and flags shown as flags.

Examples are attached as click epilogs when the commands are assembled (cli/__init__.py calls this
last), so each command's module stays about what it does. Conventions the examples follow:
`--out` is always a folder (or, for `audit`, the report file) that is written atomically;
`--json FILE` always writes the full results to FILE (eval, sweep); `inspect --json` writes to
stdout because inspecting is all that command does (`--json -` style); `--limit N` always caps the
items each metric reads.
"""

from __future__ import annotations

import typer.core

EXAMPLES: dict[str, list[str]] = {
    "build": ["unpatch build recipes/gender.yaml", "unpatch build recipes/smoke.yaml --out patches/smoke --set train.steps=20 --no-eval"],
    "validate": ["unpatch validate recipes/gender.yaml --set train.lr=1e-4"],
    "methods": ["unpatch methods"],
    "apply": ["unpatch apply patches/gender --scale 0.6 --out merged/gender",
              "unpatch apply patches/gender --prompt \"The nurse said that\"   # base vs patched, in memory"],
    "revert": ["unpatch revert merged/gender --out merged/base", "unpatch revert merged/both --patch race"],
    "stack": ["unpatch stack patches/gender patches/race --coef 1 --coef 0.5 --out patches/both"],
    "scale": ["unpatch scale patches/gender --factor 0.5 --out patches/gender-half"],
    "negate": ["unpatch negate patches/gender --out patches/gender-neg"],
    "convert": ["unpatch convert patches/gender --to delta --out patches/gender-delta",
                "unpatch convert patches/tv --to lora --rank 16 --out patches/tv-lora"],
    "inspect": ["unpatch inspect patches/gender", "unpatch inspect patches/gender --json > gender.json"],
    "verify": ["unpatch verify patches/gender --model smollm2-135m"],
    "eval": ["unpatch eval --patch patches/gender --scale 0.5 --scale 1 --json eval.json",
             "unpatch eval --model smollm2-135m --metrics crows_pairs --limit 100"],
    "sweep": ["unpatch sweep patches/gender --scales 0:1.5:0.25 --max-ppl-increase 2%"],
    "card": ["unpatch card patches/gender"],
    "metrics": ["unpatch metrics"],
    "push": ["unpatch push patches/gender --repo me/smollm2-gender-unpatch --private"],
    "pull": ["unpatch pull me/smollm2-gender-unpatch@main"],
    "audit": ["unpatch audit patches/gender --steps 20 --bits 8 --bits 4"],
}


def _epilog(lines: list[str]) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def attach(app) -> None:
    """Give every registered command without an epilog its examples."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        name = {"eval_cmd": "eval", "scale_cmd": "scale", "metrics_cmd": "metrics"}.get(name, name)
        if info.epilog is None and name in EXAMPLES:
            info.epilog = _epilog(EXAMPLES[name])

# typer 0.29 prints the value type after boolean flags (`--private <bool>`), which reads as an
# option taking a value; a flag takes none, so show no type for it
_type_of = typer.core.TyperOption.display_type_rich


def _flag_type(self, ctx):
    return None if self.is_flag else _type_of(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type
