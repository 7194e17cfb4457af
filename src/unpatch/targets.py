"""Which weights a patch touches: the default LoRA / delta targets of a model family (and why),
the `.weight` tensors they name, and the peft LoRA wrapper over them.

The recipes intend the attention AND MLP projections. peft's own table
(`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) knows where each family keeps its
attention projections, fused ones included (`query_key_value` of GPT-NeoX / Falcon / Bloom,
`c_attn` of GPT-2, `Wqkv` of MPT), but it lists only a subset (q_proj + v_proj for Llama). So:
  1. peft's mapping finds the decoder blocks: the ModuleList holding the modules it targets;
  2. the targets are the leaf names of EVERY linear layer of those blocks, in the order the
     block registers them (Llama: q, k, v, o, gate, up, down), i.e. attention + MLP;
  3. a family peft does not map falls back to the same rule on the ModuleList that holds the
     most linear weights (the decoder stack of any transformer decoder).
Linear layers outside the blocks (lm_head, OPT's project_in/out) are never defaults. Mixture-of-
experts families whose experts are fused 3-d tensors (Mixtral, Qwen3-MoE in transformers 5)
have no linear expert layers: their defaults are the attention projections (README: families).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UnpatchError


@dataclass(frozen=True)
class Targets:
    names: list[str]  # leaf module names, as peft's LoraConfig.target_modules takes them
    source: str  # recipe | peft | fallback
    why: str  # one line for `--dry-run`


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear that stores its weight transposed, [in, out] (known by name: no transformers import)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def model_type(model) -> str:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "model_type", "") or getattr(text, "model_type", "")


def peft_mapping(mtype: str) -> list[str] | str | None:
    """peft's LoRA targets for a model_type: a list of leaf names, a regex string, or None."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return mapping.get(mtype)


def _matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a regex string must match the whole name; a list matches name == t or '.t' suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _stacks(model) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """{ModuleList path: its linear layers (full name, module)} for every ModuleList with any."""
    lists = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    stacks: dict[str, list] = {}
    for name, mod in model.named_modules():
        if not is_linear(mod):
            continue
        # the innermost enclosing ModuleList would be an MoE's expert list: take the outermost
        # (walking the name's prefixes: a set lookup each, however many expert lists there are)
        parts = name.split(".")
        outer = next((p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p in lists), None)
        if outer is not None:
            stacks.setdefault(outer, []).append((name, mod))
    return stacks


def _leaves(layers: list[tuple[str, torch.nn.Module]]) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _ in layers))  # first-seen order, once each


def _fused_experts(model, stack: str) -> str:
    """A note when the blocks keep MoE experts as 3-d tensors: those are not linear layers."""
    fused = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3 and n.startswith(stack + ".")})
    return f" (the MoE experts' fused 3-d tensors {', '.join(fused)} are not linear layers: untouched)" if fused else ""


def default_targets(model, where: str = "recipe") -> list[str]:
    """The attention + MLP projections of the model (see the module doc)."""
    return choose_targets(model, None, where).names


def choose_targets(model, given: Sequence[str] | None, where: str = "recipe") -> Targets:
    """The recipe's `patch.target_modules` when it lists any, else the family default, with why."""
    if given:
        return Targets(list(given), "recipe", f"the recipe's patch.target_modules ({', '.join(given)})")
    mtype = model_type(model)
    stacks = _stacks(model)
    mapped = peft_mapping(mtype)
    if mapped is not None:
        hits = [p for p, layers in stacks.items() if any(_matches(n, mapped) for n, _ in layers)]
        if hits:
            stack = max(hits, key=lambda p: len(stacks[p]))
            shown = mapped if isinstance(mapped, str) else ", ".join(mapped)
            return Targets(_leaves(stacks[stack]), "peft", f"peft's target mapping for {mtype} ({shown}) finds the decoder "
                           f"blocks ({stack}); every linear layer of those blocks{_fused_experts(model, stack)}")
    if stacks:
        stack = max(stacks, key=lambda p: sum(m.weight.numel() for _, m in stacks[p]))
        why = f"{mtype or type(model).__name__} is not in peft's target mapping" if mapped is None else \
            f"peft's target mapping for {mtype} matches none of its modules"
        return Targets(_leaves(stacks[stack]), "fallback",
                       f"{why}: fallback rule, every linear layer of the largest stack of blocks ({stack}){_fused_experts(model, stack)}")
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
    raise UnpatchError(f"{where}: patch.target_modules: cannot guess the projections of this architecture; "
                       f"list them (its linear layers: {', '.join(linear) or 'none'})")


def target_weights(model, targets: Sequence[str], where: str = "recipe") -> dict[str, torch.nn.Parameter]:
    """`.weight` parameters of the modules peft would target (name == t or ends with '.t'),
    named as in `named_parameters()` (a tied weight under its first name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for name, mod in model.named_modules():
        if is_linear(mod) and _matches(name, list(targets)):
            found[names[id(mod.weight)]] = mod.weight
    if not found:
        raise UnpatchError(f"{where}: patch.target_modules: none of {', '.join(targets)} is a linear layer of {type(model).__name__}")
    return dict(sorted(found.items()))


def wrap_lora(model, recipe, targets: list[str], where: str):
    """peft LoRA over the targets; returns (peft model, {base weight name: its tensor})."""
    from peft import LoraConfig, get_peft_model

    conv1d = any(is_conv1d(mod) for _, mod in model.named_modules())
    cfg = LoraConfig(r=recipe.patch.rank, lora_alpha=recipe.patch.alpha, target_modules=targets, lora_dropout=0.0,
                     task_type="CAUSAL_LM", init_lora_weights=True, fan_in_fan_out=conv1d)
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise UnpatchError(f"{where}: patch.target_modules: {str(e).splitlines()[0]}") from e
    inner = peft_model.base_model.model
    originals = {f"{m}.weight": inner.get_submodule(m).get_base_layer().weight.detach() for m in peft_model.targeted_module_names}
    return peft_model, dict(sorted(originals.items()))
