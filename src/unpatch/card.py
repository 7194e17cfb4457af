"""Model card (README.md) of a patch, through huggingface_hub's ModelCard."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .patch import Patch


def render_card(patch: Patch) -> str:
    m = patch.manifest
    data = ModelCardData(
        base_model=m.base.id if "/" in m.base.id and not m.base.id.startswith("/") else None,
        library_name="peft" if m.kind == "lora" else "unpatch",
        tags=["unpatch", "unlearning", f"unpatch-{m.kind}"] + ([f"method-{m.method['name']}"] if m.method.get("name") else []),
    )
    lines = [
        f"# {m.name}", "",
        f"An **unpatch** unlearning patch (kind `{m.kind}`) for base model `{m.base.id}`.", "",
        "| field | value |", "|---|---|",
        f"| method | {m.method.get('name', '-')} |",
        f"| built-in coefficient | {m.coefficient:g} |",
        f"| base fingerprint | `{m.base.fingerprint[:16]}` over {len(m.base.tensors)} tensors ({m.base.dtype}) |",
        f"| recipe sha256 | `{(m.recipe_sha256 or '-')[:16]}` |",
        f"| created | {m.created} |", "",
        "Apply it with `unpatch apply <this folder> --scale 1.0 --out merged/`"
        + (" or load it with `PeftModel.from_pretrained(base, <this folder>)`." if m.kind == "lora" else "."),
    ]
    if m.lineage:
        lines += ["", "## Lineage", "", "| parent | coefficient |", "|---|---|"]
        lines += [f"| {p.get('name')} | {p.get('coefficient'):g} |" for p in m.lineage]
    if patch.recipe_text:
        lines += ["", "## Recipe", "", "```yaml", patch.recipe_text.rstrip(), "```"]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))
