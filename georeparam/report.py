r"""What :func:`georeparam.register` did to each layer, as one printable object.

:func:`georeparam.register` returns a :class:`Report`. Iterating it yields the qualified names
of the registered layers (``list(report)``), so code that only wants the names keeps working;
``report.layers`` holds one :class:`LayerReport` per layer it considered, registered or not.

Forms (``LayerReport.form``):

* ``"paper"``: the paper's unit ``r·f(uᵀx + λ)`` with ``r`` signed. Either ``sign(r)`` acts right
  after the unit's positively homogeneous activation (``where`` says where), or no activation
  follows the layer (an output layer, a projection feeding a norm or a residual add), where
  ``r·(uᵀx + λ)`` is that unit as it stands.
* ``"weight"``: ``f(r·(uᵀx + λ))``, the same function while ``r > 0`` and a different unit
  once ``r`` crosses zero (``why`` says why no exact place for the sign exists).
* ``None``: skipped (``why`` says why).

Example:
    >>> import torch, georeparam
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> report = georeparam.register(model)
    >>> list(report)
    ['0', '2']
    >>> report
    GmP: 2 layers registered (2 in the paper's form, 0 in the weight form), 0 skipped
      layer  type    form   where / why
      0      Linear  paper  sign(r) after 1 (ReLU)
      2      Linear  paper  no activation follows (the model's output)
"""

from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence

from torch import nn

__all__ = ["Report", "LayerReport"]


class LayerReport(NamedTuple):
    """One layer's line in a :class:`Report`.

    Attributes:
        name: qualified module name (``""`` for the model itself).
        kind: the layer's class name (before parametrization).
        form: ``"paper"``, ``"weight"``, or ``None`` when skipped.
        where: for the paper's form, where ``sign(r)`` acts (or that no activation follows).
        why: why not the paper's form, or why skipped; empty otherwise.
        stays: in the paper's form, why a sign with ``r < 0`` cannot be baked into a plain layer
            at :func:`georeparam.remove` (it then stays as a small module, see
            :class:`georeparam.signs.UnitSign`); empty when every sign can be baked.
    """

    name: str
    kind: str
    form: Optional[str]
    where: str = ""
    why: str = ""
    stays: str = ""


class Report(Sequence):
    """The outcome of :func:`georeparam.register`: a sequence of the registered names, plus details."""

    def __init__(self, layers: Sequence[LayerReport]):
        self.layers: List[LayerReport] = list(layers)

    @property
    def registered(self) -> List[LayerReport]:
        return [e for e in self.layers if e.form is not None]

    @property
    def skipped(self) -> List[LayerReport]:
        return [e for e in self.layers if e.form is None]

    def form_of(self, name: str) -> Optional[str]:
        """The form layer ``name`` got (``None`` if skipped); ``KeyError`` if it was not considered."""
        for e in self.layers:
            if e.name == name:
                return e.form
        raise KeyError(f"Report: no layer named {name!r}. Got: {[e.name for e in self.layers][:20]}")

    # -- the sequence of registered names --------------------------------------------------------
    def _names(self) -> List[str]:
        return [e.name for e in self.registered]

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self.registered)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __eq__(self, other) -> bool:
        if isinstance(other, Report):
            return self.layers == other.layers
        if isinstance(other, (list, tuple)):
            return self._names() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # -- printing ----------------------------------------------------------------------------------
    def table(self) -> str:
        n_paper = sum(e.form == "paper" for e in self.layers)
        n_weight = sum(e.form == "weight" for e in self.layers)
        head = (
            f"GmP: {len(self)} layer{'s' if len(self) != 1 else ''} registered ({n_paper} in the paper's form, "
            f"{n_weight} in the weight form), {len(self.skipped)} skipped"
        )
        rows = [("layer", "type", "form", "where / why")]
        notes: List[str] = []
        for e in self.layers:
            note = e.where if e.form == "paper" else e.why
            if e.form is None:
                note = f"skipped: {e.why}"
            if e.stays:
                notes.append(f"  [{len(notes) + 1}] {e.name or '<model>'}: {e.stays}")
                note += f" [{len(notes)}]"
            rows.append((e.name or "<model>", e.kind, e.form or "-", note))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head] + ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        if notes:
            lines += [
                "  a sign with r < 0 stays as a small module at georeparam.remove (no plain layer holds it):"
            ] + notes
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return self.table()

    __str__ = __repr__

    # Note [What register returns]
    # torch's parametrization verbs (weight_norm, spectral_norm, orthogonal) take one layer and
    # return it. register takes a whole model and decides, per layer, a form and where the sign
    # acts; the report is the only place that says so, and returning the model would make it the
    # thing nobody looks at. So register keeps returning the Report (and changes the model in
    # place), and the one way to mistake it for the model, ``model = register(model)``, fails at
    # the first use with what to write instead: calling it, or any nn.Module attribute.
    def _not_a_model(self, what: str) -> str:
        return (
            f"{what}: georeparam.register(model) changes model in place and returns this Report (the table of "
            f"what it did), not the model. Write `georeparam.register(model)` (or `report = georeparam.register(model)`) "
            f"and keep using `model`. Got: a Report of {len(self)} registered layer(s)"
        )

    def __call__(self, *args, **kwargs):
        raise TypeError(self._not_a_model("'Report' object is not callable"))

    def __getattr__(self, name: str):
        # only reached for attributes a Report lacks; dunder lookups (copy, pickle) stay plain
        if not name.startswith("_") and hasattr(nn.Module, name):
            raise AttributeError(self._not_a_model(f"'Report' object has no attribute {name!r}"))
        raise AttributeError(f"'Report' object has no attribute {name!r}")
