"""An lm-evaluation-harness model that scores a base with patches applied in memory, unmerged:

    lm_eval --model unpatch --model_args pretrained=smollm2-135m,patch=patches/gender,scale=0.6 --tasks ...

It is lm-eval's own HF backend (HFLM), so every score equals `--model hf` on the merged folder
that `unpatch apply --scale 0.6 --out` writes (same weights, same code path), without writing
one. `pretrained` takes what unpatch takes (Hub id, folder, .gguf, alias); `patch` and `scale`
take several values separated by `|` (`patch=a|b,scale=0.5|1`); `force=true` applies a patch
whose base fingerprint differs.

lm-eval (0.4.x) has no plugin entry points: it finds models in its registry only. The name
`unpatch` is added to that registry by unpatch/_lm_eval_hook.py, which the `unpatch-lm-eval.pth`
file installed beside the package loads at interpreter start (stdlib only, no lm-eval import);
`import unpatch.lm_eval_model` registers it too.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .errors import UnpatchError


def _split(value, cast=str) -> list:
    if value is None:
        return []
    if isinstance(value, int | float):
        return [cast(value)]
    return [cast(v) for v in str(value).split("|") if str(v).strip()]


@register_model("unpatch")
class UnpatchLM(HFLM):
    """HFLM over `pretrained` with unpatch patches applied in place (reverted when collected)."""

    def __init__(self, pretrained: str = "smollm2-135m", patch: str | None = None, scale: str | float | None = None,
                 force: bool | str = False, **kwargs):
        from .hub import resolve_patch
        from .model import checkpoint_folder, resolve_model
        from .patch.apply import Applied

        folder = checkpoint_folder(resolve_model(str(pretrained)))  # an alias or .gguf: its dequantised folder
        patches = [resolve_patch(p) for p in _split(patch)]
        scales = _split(scale, float) or [1.0]
        if len(scales) == 1:
            scales = scales * len(patches)
        if patches and len(scales) != len(patches):
            raise UnpatchError(f"lm_eval --model unpatch: scale has {len(scales)} values for {len(patches)} patches; "
                               "give one, or one per patch (separated by |)")
        kwargs.setdefault("tokenizer", str(folder))
        super().__init__(pretrained=str(folder), **kwargs)
        forced = str(force).lower() in ("1", "true", "yes")
        self.unpatch_applied = Applied(self.model, f"model {pretrained}")
        for p, s in zip(patches, scales, strict=True):
            self.unpatch_applied.apply(p, s, force=forced)
        self.unpatch_patches = [{"name": p.name, "patch_id": p.patch_id, "scale": s} for p, s in zip(patches, scales, strict=True)]

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["unpatch_patches"] = self.unpatch_patches  # lands in lm-eval's results["config"]
        return info
