"""The engine's attention function, registered with transformers' AttentionInterface.

transformers' attention modules look their attention function up by the config's
`_attn_implementation` on every call and pass it the forward's extra keyword arguments: the
extension point its own continuous batching uses. `use_step_attention` wraps the model's
implementation (sdpa or eager) under the name "tandem_<base>": given a `tandem_plan` (a
StepPlan, see engine/step_plan.py) it splits a mixed forward's queries by group; without one
(model.generate() on the same model object) it is the base function unchanged, and the base's
mask builder is registered under the new name too, so generate() builds the same masks.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from engine.compiled_step import DecodeBatch

_PREFIX = "tandem_"
_MASKS = {"sdpa": sdpa_mask, "eager": eager_mask}


def _base_function(name: str, module: torch.nn.Module):
    if name == "sdpa":
        return sdpa_attention_forward
    # "eager" is each model file's own function (what get_interface falls back to).
    return sys.modules[type(module).__module__].eager_attention_forward


def _wrap(base_name: str):
    def attention(module, query, key, value, attention_mask, tandem_plan=None, **kwargs):
        if isinstance(tandem_plan, DecodeBatch):  # the compiled decode step's plan
            return tandem_plan.attend(module, query, kwargs.get("scaling")), None
        base = _base_function(base_name, module)
        if tandem_plan is None or tandem_plan.written != module.layer_idx:
            # Not a forward over the engine's cache (generate(), or a model that bypassed
            # StepCache: Forward detects that and raises once the forward returns).
            return base(module, query, key, value, attention_mask, **kwargs)
        out = tandem_plan.attend(base, module, query, key, value, **kwargs)
        return out, None

    return attention


def use_step_attention(model: torch.nn.Module) -> None:
    """Make `model` attend through the engine's function (idempotent; sdpa or eager only)."""
    config = getattr(model, "config", None)
    if config is None:
        return  # not a transformers model (a test double): nothing to wrap
    base = config._attn_implementation
    if base.startswith(_PREFIX):
        return
    if base not in _MASKS:
        raise ValueError(f"attn_implementation {base!r} is not supported by the engine "
                         "(it needs 'sdpa' or 'eager')")
    name = _PREFIX + base
    AttentionInterface.register(name, _wrap(base))
    AttentionMaskInterface.register(name, _MASKS[base])
    model.set_attn_implementation(name)
