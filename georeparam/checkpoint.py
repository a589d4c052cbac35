r"""Loading a *plain* checkpoint (``weight``, ``bias``) into a GmP-registered layer.

:func:`georeparam.register` installs a ``load_state_dict`` pre-hook on every layer it converts;
the hook calls :func:`load_plain_entry`, which rewrites the plain keys of the incoming state dict
into the layer's coordinates (``parametrizations.weight.original0`` = radius, ``.original1`` =
angles, ``parametrizations.bias.original`` = offset) before PyTorch copies them.

Exactness. The checkpoint's tensors are first cast to the *model's* dtype, as a plain layer's
``load_state_dict`` would store them (its ``copy_`` casts); the coordinates are then computed in
float64 and rounded once to the model's dtype. The GmP layer so computes the plain layer's
loaded weight to ≤ 1e-6 relative in float32 whatever the checkpoint's dtype (tested in
``tests/test_loads_and_casts.py``; measured values in ``docs/checkpoints.md``), and
``λ = b / r`` keeps the bias to one rounding.

# Note [The model's dtype decides]
Coordinates computed in the checkpoint's own dtype were wrong both ways: a float16 checkpoint was
rebuilt to 4.6e-4 (bfloat16: 3.8e-3) although the float32 model holds it to 1e-7, and a float16
row of norm 1e5 (entries < 65,504) was refused although float32 holds its radius. Checked in the
checkpoint's dtype, a float64 row whose norm overflows float32 passed the check and loaded as
``r = inf``, and a float64 row of 1e-50 with bias 0.5 loaded as ``λ = inf``, bias NaN. Every
check below runs on the values the model will hold.

# Note [Missing keys]
A plain checkpoint without ``bias`` (or without ``weight``) is reported as a plain model reports
it: the plain key (``"0.bias"``) goes to ``missing_keys`` (``strict=True`` raises, as PyTorch does
after copying the keys present), and the layer keeps the current value of what was missing:
``b`` is kept under the new radius (``λ = b / r_new``), or ``w`` is kept and the bias converted
with the current radius. Filling in the coordinates quietly made ``strict=True`` answer "All keys
matched".

In the paper's form (``b = |r|·λ``, ``sign(r)`` after the activation) a plain checkpoint loads
with ``r = ‖w‖ ≥ 0``: every unit's sign is +1, which is what the plain model computes.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from .coords import to_hyperspherical
from .parametrization import GeometricWeight, check_radius, check_weight_values, offset_from
from .signs import unit_sign

__all__ = [
    "load_plain_entry",
    "record_form",
    "form_mismatches",
    "form_error",
    "check_forms",
    "check_layer_form",
    "FORM_KEY",
]


def _in_model_dtype(value: Tensor, dtype: torch.dtype, key: str) -> Tensor:
    """``value`` as the model will hold it; refuses entries that overflow the model's dtype."""
    check_weight_values(value, key)
    out = value.detach().to(dtype)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"{key}: {bad} entries of the {value.dtype} checkpoint overflow the model's {dtype} (largest "
            f"{torch.finfo(dtype).max:.3g}). Load it into a model of a wider dtype (model.to({value.dtype})) or "
            f"scale the layer down. Got: largest |entry| {float(value.abs().max()):.3g}"
        )
    return out


def _check_underflow(ckpt_rows: Tensor, radius: Tensor, bias: Tensor, key: str, dtype: torch.dtype) -> None:
    """Refuse units whose checkpoint row is non-zero but is all zeros in the model's dtype while
    their bias is not: ``b = r·λ`` cannot hold a non-zero bias on ``r = 0``."""
    lost = (ckpt_rows != 0).any(-1) & (radius == 0) & (bias != 0)
    if bool(lost.any()):
        idx = lost.nonzero().flatten()[:5].tolist()
        norms = torch.linalg.vector_norm(ckpt_rows[idx].to(torch.float64), dim=-1).tolist()
        raise ValueError(
            f"{key}: the weight rows of units {idx} underflow to 0 in the model's {dtype} while their bias is "
            f"not 0, and GmP's b = r·λ cannot hold a bias on r = 0. Load it into a float64 model, or leave "
            f"this layer Cartesian (register(..., exclude=[...])). Got: checkpoint row norms {norms}"
        )


def load_plain_entry(
    module: nn.Module,
    wname: str,
    param: GeometricWeight,
    state_dict: Dict[str, Tensor],
    prefix: str,
    missing_keys: List[str],
    error_msgs: List[str],
) -> None:
    """Rewrite the plain ``weight``/``bias`` keys of one GmP weight in ``state_dict`` in place.

    Does nothing when the checkpoint already holds this layer's coordinates. Problems go to
    ``error_msgs`` (PyTorch raises them as one ``RuntimeError`` naming the keys) and leave the
    layer's keys untouched, so the layer keeps its values.
    """
    plist = module.parametrizations[wname]
    dtype = plist.original0.dtype
    wkey = prefix + wname
    rkey = f"{prefix}parametrizations.{wname}.original0"
    akey = f"{prefix}parametrizations.{wname}.original1"
    bname = param.bias_name
    bkey = okey = None
    if bname is not None:
        bkey = prefix + bname
        okey = f"{prefix}parametrizations.{bname}.original"
    gmp_weight = rkey in state_dict or akey in state_dict
    plain_weight = wkey in state_dict and not gmp_weight
    plain_bias = bkey is not None and bkey in state_dict and okey not in state_dict
    if not plain_weight and not (plain_bias and not gmp_weight):
        return
    try:
        converted: Dict[str, Tensor] = {}
        if plain_weight:
            weight = state_dict[wkey]
            if tuple(weight.shape) != tuple(param.shape):
                error_msgs.append(
                    f"size mismatch for {wkey}: copying a param with shape {tuple(weight.shape)} from checkpoint, "
                    f"the shape in current model is {tuple(param.shape)}."
                )
                return
            rows = param.to_units(weight.detach())
            radius, angles = to_hyperspherical(param.to_units(_in_model_dtype(weight, dtype, wkey)))
            check_radius(radius, wkey)  # rows whose norm overflows the model's dtype
            if getattr(param, "direction", None) is not None:  # Note [The official 1-D unit]: s = sign(w), r = |w|
                d = unit_sign(radius)
                converted[f"{prefix}parametrizations.{wname}.0.direction"] = d
                radius = radius * d
            converted[rkey], converted[akey] = radius, angles
        else:  # a plain bias without its weight: the weight is missing, and kept
            converted[rkey], converted[akey] = plist.original0.detach().clone(), plist.original1.detach().clone()
            # the radius the bias is carried by: |r| in the paper's form (b = |r|·λ)
            radius = converted[rkey].abs() if getattr(param, "sign_after", False) else converted[rkey]
            rows = None
        if bname is not None and (plain_bias or okey not in state_dict):
            if plain_bias:
                bias = state_dict[bkey]
                if tuple(bias.shape) != (param.units,):
                    raise ValueError(f"{bkey} must have shape ({param.units},). Got: {tuple(bias.shape)}")
                bias = _in_model_dtype(bias, dtype, bkey)
            else:  # a plain weight without its bias: the bias is missing, and kept
                bias = getattr(module, bname).detach()
            if rows is not None:
                _check_underflow(rows, radius, bias, wkey, dtype)
            converted[okey] = offset_from(bias, radius, bkey)
    except (TypeError, ValueError) as e:
        error_msgs.append(str(e))
        return
    if plain_weight:
        del state_dict[wkey]
    else:
        missing_keys.append(wkey)
    if plain_bias:
        del state_dict[bkey]
    elif okey is not None and okey not in state_dict:
        missing_keys.append(bkey)
    state_dict.update(converted)


# -------------------------------------------------------------------------------------------------
# the form is part of the state
# -------------------------------------------------------------------------------------------------

#: the ``state_dict._metadata`` entry of a GmP layer: ``{weight name: "sign_after" | "inside"}``
FORM_KEY = "georeparam_form"


def _form_of(param) -> str:
    return "sign_after" if getattr(param, "sign_after", False) else "inside"


_WORDS = {
    "sign_after": "the paper's form with sign(r) after the activation (|r| in the layer)",
    "inside": "r inside the layer (the weight form, or a unit with no activation)",
}


def record_form(module: nn.Module, destination, prefix: str, local_metadata) -> None:
    """``state_dict`` hook of a GmP layer: records each GmP weight's form in the checkpoint's metadata.

    # Note [The form is part of the state]
    The same coordinates ``(r, θ, λ)`` compute ``s·f(|r|·z)`` in the paper's form and ``f(r·z)``
    in the weight form: equal while every ``r > 0``, different once one is negative (a relative
    output difference of 1.93 with five radii negative was measured). Which form a layer gets
    depends on the model's code and on whether ``torch.fx`` could read it, so a checkpoint must
    say which it was saved in. It is kept in ``state_dict._metadata`` (as PyTorch keeps each
    module's ``version``): no key is added, so ``strict`` loading and key lists are unchanged, and
    ``torch.save`` keeps it. Loading compares it (:func:`check_forms`). A GmP checkpoint without
    the record (saved before it existed, or rebuilt as a plain ``dict``, which drops
    ``_metadata``) loads unchecked, as before; a plain checkpoint loads into either form.
    """
    plists = getattr(module, "parametrizations", {})
    forms = {n: _form_of(pl[0]) for n, pl in plists.items() if len(pl) and type(pl[0]).__name__ == "GeometricWeight"}
    if forms:
        local_metadata[FORM_KEY] = forms


def form_mismatches(model: nn.Module, state_dict, prefix: str = "") -> List[str]:
    """``"layer: checkpoint … / model …"`` for every GmP layer whose recorded form differs from the model's."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    out = []
    for qname, m in model.named_modules():
        plists = getattr(m, "parametrizations", None)
        if plists is None:
            continue
        full = f"{prefix}{qname}" if qname else prefix[:-1]
        saved = metadata.get(full, {}).get(FORM_KEY)
        if not saved:
            continue
        for wname, pl in plists.items():
            if not len(pl) or type(pl[0]).__name__ != "GeometricWeight" or wname not in saved:
                continue
            if f"{full + '.' if full else ''}parametrizations.{wname}.original0" not in state_dict:
                continue  # a plain entry: loads into either form
            have = _form_of(pl[0])
            if saved[wname] != have:
                out.append(
                    f"{full or '<model>'} (checkpoint: {_WORDS.get(saved[wname], saved[wname])}; model: {_WORDS[have]})"
                )
    return out


def form_error(where: str, bad: List[str]) -> ValueError:
    want = []
    if any("checkpoint: the paper" in b for b in bad):
        want.append(
            "georeparam.register(model, form='paper') where the checkpoint's layers had sign(r) after the activation"
        )
    if any("checkpoint: r inside" in b for b in bad):
        want.append("form='weight' where they had r inside the layer")
    return ValueError(
        f"{where}: the checkpoint holds GmP coordinates saved in another form than this model's for "
        f"{len(bad)} layer(s); the same (r, θ, λ) compute another function once an r < 0 (Note [The form is "
        f"part of the state]). Register the model as the checkpoint's was ({'; '.join(want)}; with the same model "
        f"code and torch/transformers versions, which decide where sign(r) can go), or save a plain checkpoint "
        f"(georeparam.plain_state_dict), which loads into either form. Nothing was loaded. Got: {bad[:5]}"
    )


def check_forms(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook of a registered model's root: refuses a checkpoint of another
    form before anything is copied (:func:`form_mismatches`)."""
    bad = form_mismatches(module, state_dict, prefix)
    if bad:
        raise form_error(f"load_state_dict into {type(module).__name__}", bad)


def check_layer_form(module: nn.Module, prefix: str, local_metadata) -> None:
    """The same check for one layer (its own ``load_state_dict`` pre-hook; a layer loaded alone,
    or a model wrapped after ``register``, whose root has no :func:`check_forms`)."""
    saved = (local_metadata or {}).get(FORM_KEY)
    if not saved:
        return
    bad = [
        f"{prefix[:-1] or '<layer>'}.{w} (checkpoint: {_WORDS.get(saved[w], saved[w])}; model: {_WORDS[_form_of(pl[0])]})"
        for w, pl in getattr(module, "parametrizations", {}).items()
        if len(pl) and type(pl[0]).__name__ == "GeometricWeight" and w in saved and saved[w] != _form_of(pl[0])
    ]
    if bad:
        raise form_error(f"load_state_dict into {type(module).__name__}", bad)
