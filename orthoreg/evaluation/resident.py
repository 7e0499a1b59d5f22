"""θ0 + Σ_k α_k·τ_k evaluated in place: no deep copies, no checkpoint reloads.

The coefficient searches of DESIGN.md §2 (addition over 21 α, negation, the
weight-disentanglement grid) evaluate one backbone at many points of weight space. The
reference code reloads the pretrained checkpoint for every point; here θ0 of the edited
tensors is copied once, the live tensors are overwritten with θ0 + Σ α·τ by a fused
``torch.add(..., out=)``, and θ0 is copied back bit-exactly when the edit ends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from orthoreg.paradigms.linear import LinearizedModel
from orthoreg.taskvector import TaskVector, TaskVectorMismatch
from orthoreg.utils.provenance import fingerprint_state

#: one term α·τ of an edit
Edit = tuple[Mapping[str, Tensor], float]


def check_alpha(alpha: float) -> float:
    """A coefficient must be a finite real number: NaN would silently poison θ."""
    value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"coefficient α must be finite, got {alpha!r}")
    return value


class ResidentModel:
    """A backbone whose weights are moved to θ0 + Σ α·τ and back, in place.

    θ0 of a tensor is snapshotted the first time a vector edits it (so only edited tensors
    cost memory) and lives on the backbone's device. Edits do not nest: inside ``edited``
    the live weights are not θ0, so a second edit would snapshot the wrong reference.
    """

    def __init__(self, backbone: nn.Module, verify_base: bool = True) -> None:
        self.backbone = backbone
        self.verify_base = verify_base
        self._theta0: dict[str, Tensor] = {}
        self._fingerprint: str | None = None
        self._linearized: dict[tuple[str, ...], LinearizedModel] = {}
        self._editing = False

    # ----------------------------------------------------------------- validation
    def state(self) -> dict[str, Tensor]:
        """The backbone's editable tensors by name: parameters and buffers, as apply_to sees them."""
        state = dict(self.backbone.named_parameters())
        state.update(dict(self.backbone.named_buffers()))
        return state

    @property
    def fingerprint(self) -> str:
        """θ0's content hash, as recorded in a task vector's ``base_fingerprint``."""
        if self._fingerprint is None:
            if self._editing:
                raise RuntimeError("cannot fingerprint θ0 while the backbone is edited")
            self._fingerprint = fingerprint_state(self.backbone.state_dict())
        return self._fingerprint

    def check(self, vector: Mapping[str, Tensor]) -> None:
        """Raise TaskVectorMismatch if ``vector`` does not fit this backbone's θ0.

        Names and shapes always; the base fingerprint too when the vector records one and
        ``verify_base`` is on (turn it off for a backbone cast to another dtype, whose bytes
        — hence fingerprint — differ from the θ0 the vector was trained from).
        """
        if isinstance(vector, TaskVector):
            vector.check_against(self.state())
            expected = vector.metadata.get("base_fingerprint")
            if self.verify_base and expected is not None and expected != self.fingerprint:
                raise TaskVectorMismatch(
                    f"task vector was made from base model {expected!r}, but this backbone is "
                    f"{self.fingerprint!r} (pass verify_base=False only for a cast copy of θ0)"
                )
        else:
            TaskVector(vector).check_against(self.state())

    def localize(self, vector: Mapping[str, Tensor]) -> TaskVector:
        """The vector checked and moved to the backbone's devices/dtypes, once per search.

        Doing this before a grid means no edit inside the grid transfers or casts τ.
        """
        self.check(vector)
        state = self.state()
        metadata = vector.metadata if isinstance(vector, TaskVector) else {}
        return TaskVector({n: t.to(state[n]) for n, t in vector.items()}, metadata)

    # ----------------------------------------------------------------- editing
    @contextlib.contextmanager
    def edited(self, *edits: Edit) -> Iterator[nn.Module]:
        """``with resident.edited((τ1, α1), (τ2, α2)):`` the backbone computes f(x; θ0 + Σ α·τ).

        Every vector is validated and every α checked before any weight moves. On exit —
        normal or by exception — the edited tensors are restored to θ0 bit for bit.
        """
        if self._editing:
            raise RuntimeError("ResidentModel edits do not nest; leave the current edit first")
        if not edits:
            raise ValueError("edited() needs at least one (vector, alpha) pair")
        alphas = [check_alpha(alpha) for _, alpha in edits]
        for vector, _ in edits:
            self.check(vector)
        state = self.state()
        names = list(dict.fromkeys(name for vector, _ in edits for name in vector))
        with torch.no_grad():
            for name in names:
                if name not in self._theta0:
                    self._theta0[name] = state[name].detach().clone()
        self._editing = True
        try:
            with torch.no_grad():
                written: set[str] = set()
                for (vector, _), alpha in zip(edits, alphas):
                    for name, tau in vector.items():
                        target = state[name].data
                        tau = tau.to(target)
                        if name in written:
                            target.add_(tau, alpha=alpha)
                        else:
                            torch.add(self._theta0[name], tau, alpha=alpha, out=target)
                            written.add(name)
            yield self.backbone
        finally:
            with torch.no_grad():
                for name in names:
                    state[name].data.copy_(self._theta0[name])
            self._editing = False

    # ----------------------------------------------------------------- tangent space
    def linearized(self, names: Sequence[str]) -> LinearizedModel:
        """A LinearizedModel around θ0 over ``names``, built once and cached.

        Building one flips the backbone's ``requires_grad`` flags; they are restored so that
        evaluating a tangent vector leaves the caller's backbone as it was.
        """
        key = tuple(names)
        if key not in self._linearized:
            flags = {n: p.requires_grad for n, p in self.backbone.named_parameters()}
            training = [(m, m.training) for m in self.backbone.modules()]
            try:
                self._linearized[key] = LinearizedModel(self.backbone, list(names))
            finally:
                for name, param in self.backbone.named_parameters():
                    param.requires_grad_(flags[name])
                for module, mode in training:
                    module.training = mode
        return self._linearized[key]


def as_resident(model: nn.Module | ResidentModel) -> ResidentModel:
    """Accept a bare backbone or a ResidentModel (whose θ0 snapshots are then reused)."""
    return model if isinstance(model, ResidentModel) else ResidentModel(model)

