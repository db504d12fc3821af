"""kohya-ss/sd-scripts and LyCORIS ``.safetensors`` files: LoRA/LoCon (Tucker), LoHa, LoKr, DoRA.

Keys are ``<name>.<suffix>``. ``<name>`` is the module path with dots replaced by underscores
behind a prefix: ``lora_unet_``, ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL) from
sd-scripts and ``lycoris.kohya``, ``lycoris_`` from LyCORIS' ``create_lycoris``. Per module, as
lycoris-lora 4.1.3 saves it (``lycoris/modules/*.py``, ``custom_state_dict``), with ``K = kh·kw``
and every ΔW taken on the flattened ``(out, in·K)`` view of the kernel::

    LoRA/LoCon  lora_down.weight (r, in) | (r, in, kh, kw)   ΔW = s · up @ down
                lora_up.weight   (out, r) | (out, r, 1, 1)
      Tucker    lora_mid.weight  (r, r, kh, kw), down (r, in, 1, 1):
                                 ΔW[o, (i, k)] = s · Σ_ab up[o, a] mid[a, b, k] down[b, i]
    LoHa        hada_w1_a, hada_w2_a (out, r); hada_w1_b, hada_w2_b (r, in·K)
                                 ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b)
      Tucker    hada_t1, hada_t2 (r, r, kh, kw); hada_w*_a (r, out) (transposed); hada_w*_b (r, in)
                                 each half W_k[o, (i, k)] = Σ_pq t_k[p, q, k] w_ka[p, o] w_kb[q, i]
    LoKr        lokr_w1 (a, c) | lokr_w1_a (a, r) and lokr_w1_b (r, c)
                lokr_w2 (b, d[, kh, kw]) | lokr_w2_a (b, r) and lokr_w2_b (r, d·K)
                | lokr_t2 (r, r, kh, kw) with lokr_w2_a (r, b) and lokr_w2_b (r, d)
                                 ΔW = s · kron(W1, W2), out = a·b, in·K = c·d·K
    all         alpha (0-d); dora_scale for DoRA (below)

Scale (``LoConModule``/``LohaModule``/``LokrModule.__init__``): ``s = alpha / r`` with an
``alpha`` that is 0 or absent meaning ``alpha = r``; ``r`` is ``lora_down``'s rows, LoHa's
``hada_w1_b`` rows, LoKr's ``lokr_w1_b`` rows (else ``lokr_w2_b``'s); a LoKr whose ``W1`` and
``W2`` are both full has ``s = 1`` whatever its ``alpha`` says (LyCORIS sets ``alpha = lora_dim``
then; ComfyUI and diffusers' ``_bake_lokr_alpha_`` agree). rsLoRA files store
``alpha·sqrt(r)``, so ``alpha / r`` is their scale too. The scale is applied once, as the
forward pass does (LyCORIS 4.1.3's own ``get_diff_weight``/``merge_to`` apply it twice for LoHa
and LoKr; its forward, ComfyUI, sd-scripts and peft once). The multiplier is a runtime setting,
not stored: every update here is at multiplier 1.

Every family is read into its exact factored form (:mod:`lorascope.families`, float64): Tucker
cores by :func:`~lorascope.families.tucker_factors`, LoHa by face-splitting/Khatri–Rao products
(width ``r²``), LoKr by Kronecker products of its halves (a full half as ``(I, W)``/``(W, I)``).

DoRA (``dora_wd=True``; ``functional/general.py:_weight_decompose``): ``dora_scale`` ``(out, 1,
…)`` (``wd_on_out=True``) rescales rows, ``(1, in, …)`` (``wd_on_out=False``) input channels
(for a conv, each channel's ``K`` consecutive columns together), ``W' = V·m/(‖V‖ + eps)`` with
``V = W + ΔW`` and ``eps = finfo(dtype).eps`` of the dtype LyCORIS computes the norm in: float64
for a float64 ``dora_scale``, else float32 (the parameter's dtype when it loads a file).

Refused, never skipped: full weight differences (``diff``), (IA)³, GLoRA, (Diag-)OFT/BOFT,
T-LoRA and norm modules, and any key this reader does not know. DyLoRA files are LoRA files.

:func:`write_kohya` writes the LoRA layout back (``lorascope resize`` of a kohya file).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from lorascope._files import save_safetensors
from lorascope.adapter import Adapter, LoraModule, Magnitude
from lorascope.errors import FormatError, NonFiniteError, ShapeError
from lorascope.families import (
    full_as_factors,
    hadamard_factors,
    kron_factors,
    tucker_factors,
)
from lorascope.formats._common import (
    Probe,
    ReadOptions,
    check_finite,
    check_tensors,
    make_module,
    missing_partner,
    one_line,
    read_tensors,
    shape,
)

__all__ = ["read_kohya", "write_kohya", "is_kohya_key"]

# Up/down suffixes: sd-scripts / LyCORIS, and the older diffusers attention-processor spellings.
_DOWN = ("lora_down.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_UP = ("lora_up.weight", "lora.up.weight", "lora_linear_layer.up.weight")
_MID = "lora_mid.weight"
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_SHARED = ("alpha", "dora_scale")
# LyCORIS modules whose update this reader does not model, by a tensor only they store.
_REFUSED = {
    "diff": "a full weight difference (LyCORIS algo=full), not a low-rank update",
    "diff_b": "a full weight difference (LyCORIS algo=full), not a low-rank update",
    "on_input": "an (IA)³ scaling vector: it multiplies W (ΔW = diag(w)·W), no low-rank update",
    "oft_blocks": "an OFT/BOFT rotation: it multiplies W, no additive low-rank update",
    "rescale": "an OFT/BOFT rescaling: it multiplies W, no additive low-rank update",
    "a1.weight": "a GLoRA module: its update W·a1·a2 + b1·b2 depends on W",
    "a2.weight": "a GLoRA module: its update W·a1·a2 + b1·b2 depends on W",
    "b1.weight": "a GLoRA module: its update W·a1·a2 + b1·b2 depends on W",
    "b2.weight": "a GLoRA module: its update W·a1·a2 + b1·b2 depends on W",
    "bm.weight": "a GLoRA module: its update W·a1·a2 + b1·b2 depends on W",
    "lambda_layer": "a T-LoRA module: its update depends on the diffusion timestep",
    "q_layer.weight": "a T-LoRA module: its update depends on the diffusion timestep",
    "p_layer.weight": "a T-LoRA module: its update depends on the diffusion timestep",
    "w_norm": "a norm-layer weight difference (LyCORIS train_norm), not a low-rank update",
    "b_norm": "a norm-layer weight difference (LyCORIS train_norm), not a low-rank update",
    "weight": "an (IA)³ scaling vector: it multiplies W (ΔW = diag(w)·W), no low-rank update",
}
_SUFFIXES = (*_DOWN, *_UP, _MID, *_LOHA, *_LOKR, *_SHARED, *_REFUSED)
# Longest suffix first, so that "x.lora_down.weight" is never read as "x.lora_down" + "weight".
_KEY_RE = re.compile(
    r"^(?P<name>.+?)\.(?P<suffix>"
    + "|".join(re.escape(s) for s in sorted(_SUFFIXES, key=len, reverse=True))
    + r")$"
)
# Tensors only LyCORIS writes, claimed so that their modules are refused with a reason (a
# module name without dots: the kohya/LyCORIS spelling).
_LYCORIS_ONLY_RE = re.compile(
    r"^[^.]+\.(lora_mid\.weight|dora_scale|diff|diff_b|on_input|oft_blocks|lambda_layer"
    r"|w_norm|a1\.weight|q_layer\.weight)$"
)


def is_kohya_key(key: str) -> bool:
    """Whether a key is one of sd-scripts' / LyCORIS' per-module tensors."""
    return (
        any(s in key for s in ("lora_down", "lora_up", ".hada_", ".lokr_", "lora.down", "lora.up"))
        or _LYCORIS_ONLY_RE.match(key) is not None
    )


# ----------------------------------------------------------------------------- reader


def read_kohya(
    path: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    alpha: float | None = None,
    fan_in_fan_out: bool | None = None,
) -> Adapter:
    """Read a kohya / LyCORIS file: LoRA/LoCon (Tucker), LoHa, LoKr, each optionally DoRA.

    Parameters
    ----------
    path : str or Path
    tensors, metadata : optional
        The file's tensors and safetensors metadata when the caller already read them.
    alpha : float, optional
        Overrides every module's stored alpha (``s = alpha / r``; a LoKr with both halves full
        keeps ``s = 1``, as LyCORIS does).
    fan_in_fan_out : bool, optional
        Orientation of the base weights (default False: sd-scripts patches Linear/Conv2d).

    Returns
    -------
    Adapter
        One module per ``<name>``, in file order, ``ΔW = scale · B @ A`` exactly:
        LoRA ``A = down`` ``(r, in·K)``, ``B = up`` ``(out, r)`` as stored; Tucker LoRA, LoHa and
        LoKr as their float64 factored forms (see the module docstring). ``family`` is
        ``lora``/``dora``/``loha``/``lokr``, ``nominal_rank`` LyCORIS' ``lora_dim`` (None for a
        LoKr with both halves full), ``n_params`` the elements stored for the module (``alpha``
        excepted), ``magnitude`` the ``dora_scale``. ``config`` is the file's metadata.

    Raises
    ------
    FormatError
        A module of a family this reader does not model (full ``diff``, (IA)³, GLoRA, OFT/BOFT,
        T-LoRA, norms), one that mixes families, or a key it does not know: one line naming the
        file, the module and what it is.
    ShapeError
        A factor without its partner, or tensors whose shapes do not fit together.
    NonFiniteError
        NaN/Inf in a stored tensor.
    """
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_tensors(path)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise FormatError(
                f"{path}: {key} {shape(t)} is not a kohya/LyCORIS module tensor this reader "
                "knows; refusing the file rather than leaving it out"
            )
        groups.setdefault(m["name"], {})[m["suffix"]] = (key, t)

    modules = [
        _module(name, parts, path, alpha, bool(fan_in_fan_out)) for name, parts in groups.items()
    ]
    if not modules:
        raise FormatError(f"{path}: no LoRA modules to analyse (no lora_down/lora_up)")
    return Adapter(modules=modules, path=str(path), format="kohya", config=dict(metadata or {}))


def _module(
    name: str,
    parts: dict[str, tuple[str, torch.Tensor]],
    path: Path,
    alpha: float | None,
    fan_in_fan_out: bool,
) -> LoraModule:
    """One module's tensors (suffix -> (key, tensor)) as a :class:`LoraModule`."""
    refused = next((s for s in parts if s in _REFUSED), None)
    if refused is not None and not (refused == "weight" and "on_input" not in parts):
        keys = ", ".join(k for k, _ in parts.values())
        raise FormatError(f"{path}: {name} ({keys}) is {_REFUSED[refused]}; refusing the file")
    if refused == "weight":  # a bare <name>.weight: not a LyCORIS tensor
        key, t = parts["weight"]
        raise FormatError(
            f"{path}: {key} {shape(t)} is a whole weight, not a kohya/LyCORIS module tensor; "
            "refusing the file rather than leaving it out"
        )
    families = [
        fam
        for fam, suffixes in (("LoRA", (*_DOWN, *_UP, _MID)), ("LoHa", _LOHA), ("LoKr", _LOKR))
        if any(s in parts for s in suffixes)
    ]
    if len(families) > 1:
        raise FormatError(
            f"{path}: {name} mixes {' and '.join(families)} tensors; LyCORIS writes one family "
            "per module"
        )
    if not families:
        keys = ", ".join(k for k, _ in parts.values())
        raise FormatError(f"{path}: {name} holds only {keys}, no factors to read")
    plain = families[0] == "LoRA" and _MID not in parts  # make_module checks down/up itself
    skip = (*_DOWN, *_UP, "alpha") if plain else ("alpha",)
    check_tensors({k: t for s, (k, t) in parts.items() if s not in skip}, path)
    read = {"LoRA": _lora, "LoHa": _loha, "LoKr": _lokr}[families[0]]
    f = read(name, parts, path, alpha)
    magnitude = None
    if "dora_scale" in parts:
        magnitude = _magnitude(parts["dora_scale"], f["d_out"], f["d_in"], f["in_ch"], path)
    family = f["family"]
    if magnitude is not None and family == "lora":
        family = "dora"
    keys = tuple(k for k, _ in (parts[s] for s in f["order"] if s in parts))
    return make_module(
        name,
        f["A"],
        f["B"],
        alpha=f["alpha"],
        scale=f["scale"],
        source=path,
        keys=keys,
        fan_in_fan_out=fan_in_fan_out,
        family=family,
        nominal_rank=f["r"],
        n_params=sum(int(t.numel()) for s, (_, t) in parts.items() if s != "alpha"),
        magnitude=magnitude,
    )


def _alpha_scale(
    parts: dict[str, tuple[str, torch.Tensor]], r: int, override: float | None, path: Path
) -> tuple[float, float]:
    """``(alpha, alpha / r)`` with LyCORIS' rule: a stored alpha of 0, or none, is ``r``.

    The stored 0-d tensor is read in float64 (``_common.scalar`` rounds through float32)."""
    stored = 0.0
    if "alpha" in parts:
        key, t = parts["alpha"]
        if t.numel() != 1:
            raise ShapeError(f"{path}: {key} should be a scalar, got shape {shape(t)}")
        stored = float(t.detach().reshape(()).double())
        if not math.isfinite(stored):
            raise NonFiniteError(f"{path}: {key} is {stored}")
    if r <= 0:
        raise ShapeError(f"{path}: a factor of rank {r} (an empty matrix) is not a LoRA factor")
    a = float(override) if override is not None else (stored if stored != 0 else float(r))
    return a, a / r


def _matrix(parts, suffix: str, path: Path, what: str) -> torch.Tensor:
    """A stored factor that must be a 2-D matrix, in float64."""
    key, t = parts[suffix]
    if t.ndim != 2:
        raise ShapeError(f"{path}: {key} has shape {shape(t)}, expected {what}")
    return t.double()


def _flat(parts, suffix: str, path: Path, what: str) -> torch.Tensor:
    """A stored factor ``(r, n, *kernel)`` flattened to ``(r, n·K)`` in float64."""
    key, t = parts[suffix]
    if t.ndim < 2:
        raise ShapeError(f"{path}: {key} has shape {shape(t)}, expected {what}")
    return t.double().reshape(t.shape[0], -1)


def _need(parts, name: str, path: Path, have: str, want: tuple[str, ...]) -> None:
    """``have`` needs every suffix in ``want`` beside it."""
    for w in want:
        if w not in parts:
            raise missing_partner(path, parts[have][0], f"{name}.{w}")


def _pair(path: Path, kp: str, P: torch.Tensor, kq: str, Q: torch.Tensor) -> None:
    """``P`` ``(n, k)`` and ``Q`` ``(k, m)`` must form ``P @ Q``."""
    if P.shape[1] != Q.shape[0]:
        raise ShapeError(
            f"{path}: {kp} {shape(P)} and {kq} {shape(Q)} do not form a product "
            f"({P.shape[1]} columns vs {Q.shape[0]} rows)"
        )


def _tucker(
    parts, path: Path, core_s: str, down_s: str, up_s: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` of LyCORIS' ``rebuild_tucker(core, up, down)``, checked: core
    ``(r_up, r_down, *kernel)``, down ``(r_down, in)``, up ``(r_up, out)``."""
    (kc, core), (kd, down), (ku, up) = parts[core_s], parts[down_s], parts[up_s]
    if core.ndim < 3 or down.ndim != 2 or up.ndim != 2:
        raise ShapeError(
            f"{path}: Tucker tensors {kc} {shape(core)}, {kd} {shape(down)}, {ku} {shape(up)}: "
            "expected (r, r, *kernel), (r, in), (r, out)"
        )
    if core.shape[0] != up.shape[0] or core.shape[1] != down.shape[0]:
        raise ShapeError(
            f"{path}: Tucker core {kc} {shape(core)} does not fit {ku} {shape(up)} and "
            f"{kd} {shape(down)} (expected ({up.shape[0]}, {down.shape[0]}, *kernel))"
        )
    return tucker_factors(core.double(), down.double(), up.double())


def _lora(name: str, parts, path: Path, alpha: float | None) -> dict:
    """LoRA/LoCon: ``up @ down`` (as stored), or the Tucker form with ``lora_mid``."""
    down = next((s for s in _DOWN if s in parts), None)
    up = next((s for s in _UP if s in parts), None)
    if down is None or up is None:
        have = up or down or _MID
        want = _DOWN[_UP.index(up)] if up is not None else _UP[_DOWN.index(down or _DOWN[0])]
        raise missing_partner(path, parts[have][0], f"{name}.{want}")
    (kd, D), (ku, U) = parts[down], parts[up]
    if D.ndim < 2 or U.ndim < 2:
        bad, t = (kd, D) if D.ndim < 2 else (ku, U)
        raise ShapeError(f"{path}: {bad} has shape {shape(t)}, expected a matrix or conv kernel")
    r = int(D.shape[0])
    a, s = _alpha_scale(parts, r, alpha, path)
    out = {"family": "lora", "r": r, "alpha": a, "scale": s, "order": (down, up, _MID, *_SHARED)}
    out["in_ch"] = int(D.shape[1]) if D.ndim > 2 else None
    if _MID not in parts:  # make_module flattens a conv down (r, in, kh, kw) -> (r, in·K)
        return {**out, "A": D, "B": U, "d_out": int(U.shape[0]), "d_in": int(D[0].numel())}
    if D.ndim < 3 or any(int(k) != 1 for k in D.shape[2:]):
        raise ShapeError(
            f"{path}: {kd} has shape {shape(D)}: with {name}.{_MID} the down-projection is "
            "(r, in, 1, 1)"
        )
    if any(int(k) != 1 for k in U.shape[2:]):
        raise ShapeError(f"{path}: {ku} has shape {shape(U)}: an up-projection has no kernel")
    flat = {
        _MID: parts[_MID],
        "down": (kd, D.reshape(r, -1)),  # (r, in)
        "up": (ku, U.reshape(U.shape[0], U.shape[1]).T),  # (r, out)
    }
    P, Q = _tucker(flat, path, _MID, "down", "up")  # (out, r), (r, in·K)
    return {**out, "A": Q, "B": P, "d_out": int(P.shape[0]), "d_in": int(Q.shape[1])}


def _loha(name: str, parts, path: Path, alpha: float | None) -> dict:
    """LoHa: ``(w1a w1b) ⊙ (w2a w2b)`` as face-splitting × Khatri–Rao, width ``r1·r2``."""
    present = next(s for s in _LOHA if s in parts)
    _need(parts, name, path, present, _LOHA[:4])
    tucker = "hada_t1" in parts or "hada_t2" in parts
    halves = []
    for k in ("1", "2"):
        sa, sb, st = f"hada_w{k}_a", f"hada_w{k}_b", f"hada_t{k}"
        if tucker:
            _need(parts, name, path, present, (st,))
            halves.append(_tucker(parts, path, st, sb, sa))  # w_a (r, out), w_b (r, in)
        else:
            P = _matrix(parts, sa, path, "(out, r)")
            Q = _flat(parts, sb, path, "(r, in·kh·kw)")
            _pair(path, parts[sa][0], P, parts[sb][0], Q)
            halves.append((P, Q))
    (P1, Q1), (P2, Q2) = halves
    if P1.shape[0] != P2.shape[0] or Q1.shape[1] != Q2.shape[1]:
        raise ShapeError(
            f"{path}: {name}: the LoHa halves have shapes ({P1.shape[0]}, {Q1.shape[1]}) and "
            f"({P2.shape[0]}, {Q2.shape[1]}); a Hadamard product needs equal shapes"
        )
    r1, r2 = int(parts["hada_w1_b"][1].shape[0]), int(parts["hada_w2_b"][1].shape[0])
    if r1 != r2:
        raise ShapeError(
            f"{path}: {name}: hada_w1_b has rank {r1} but hada_w2_b {r2}; LyCORIS' LoHa has one "
            "rank, and its alpha / r is ambiguous otherwise"
        )
    a, s = _alpha_scale(parts, r1, alpha, path)
    B, A = hadamard_factors(P1, Q1, P2, Q2)  # (out, r²), (r², in·K)
    in_ch = None
    if tucker:
        in_ch = int(parts["hada_w1_b"][1].shape[1])
    elif parts["hada_w1_b"][1].ndim > 2:
        in_ch = int(parts["hada_w1_b"][1].shape[1])
    order = ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a", "hada_t1", "hada_t2", *_SHARED)
    return {
        "family": "loha",
        "r": r1,
        "alpha": a,
        "scale": s,
        "order": order,
        "A": A,
        "B": B,
        "d_out": int(B.shape[0]),
        "d_in": int(A.shape[1]),
        "in_ch": in_ch,
    }


def _lokr(name: str, parts, path: Path, alpha: float | None) -> dict:
    """LoKr: ``kron(W1, W2)`` as ``kron(P1, P2) @ kron(Q1, Q2)``, each half full or low-rank."""
    present = next(s for s in _LOKR if s in parts)
    if "lokr_w1" in parts and ("lokr_w1_a" in parts or "lokr_w1_b" in parts):
        raise FormatError(f"{path}: {name} holds both lokr_w1 and lokr_w1_a/lokr_w1_b")
    if "lokr_w2" in parts and any(s in parts for s in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
        raise FormatError(
            f"{path}: {name} holds both lokr_w2 and lokr_w2_a/lokr_w2_b/lokr_t2; LyCORIS writes "
            "one or the other"
        )
    # W1 (a, c): the small Kronecker factor
    r = None
    if "lokr_w1" in parts:
        W1 = _matrix(parts, "lokr_w1", path, "(a, c)")
        P1, Q1 = full_as_factors(W1)
        c = int(W1.shape[1])
    else:
        _need(parts, name, path, present, ("lokr_w1_a", "lokr_w1_b"))
        P1 = _matrix(parts, "lokr_w1_a", path, "(a, r)")
        Q1 = _matrix(parts, "lokr_w1_b", path, "(r, c)")
        _pair(path, parts["lokr_w1_a"][0], P1, parts["lokr_w1_b"][0], Q1)
        r, c = int(Q1.shape[0]), int(Q1.shape[1])
    # W2 (b, d·K): full, low-rank, or Tucker
    in_ch = None
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"][1]
        if w2.ndim < 2:
            raise ShapeError(f"{path}: {parts['lokr_w2'][0]} has shape {shape(w2)}")
        P2, Q2 = full_as_factors(w2.double().reshape(w2.shape[0], -1))
        in_ch = c * int(w2.shape[1]) if w2.ndim > 2 else None
    else:
        _need(parts, name, path, present, ("lokr_w2_a", "lokr_w2_b"))
        if "lokr_t2" in parts:  # w2_a (r, b), w2_b (r, d)
            P2, Q2 = _tucker(parts, path, "lokr_t2", "lokr_w2_b", "lokr_w2_a")
            in_ch = c * int(parts["lokr_w2_b"][1].shape[1])
        else:
            P2 = _matrix(parts, "lokr_w2_a", path, "(b, r)")
            Q2 = _flat(parts, "lokr_w2_b", path, "(r, d·kh·kw)")
            _pair(path, parts["lokr_w2_a"][0], P2, parts["lokr_w2_b"][0], Q2)
            w2b = parts["lokr_w2_b"][1]
            in_ch = c * int(w2b.shape[1]) if w2b.ndim > 2 else None
        r2 = int(parts["lokr_w2_b"][1].shape[0])
        if r is not None and r2 != r:
            raise ShapeError(
                f"{path}: {name}: lokr_w1_b has rank {r} but lokr_w2_b {r2}; LyCORIS' LoKr has "
                "one rank, and its alpha / r is ambiguous otherwise"
            )
        r = r2
    if r is None:  # both halves full: LyCORIS sets alpha = lora_dim, so s = 1
        a, s = None, 1.0
    else:
        a, s = _alpha_scale(parts, r, alpha, path)
    B, A = kron_factors(P1, Q1, P2, Q2)  # (a·b, k1·k2), (k1·k2, c·d·K)
    order = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
        *_SHARED,
    )
    return {
        "family": "lokr",
        "r": r,
        "alpha": a,
        "scale": s,
        "order": order,
        "A": A,
        "B": B,
        "d_out": int(B.shape[0]),
        "d_in": int(A.shape[1]),
        "in_ch": in_ch,
    }


def _magnitude(
    stored: tuple[str, torch.Tensor], d_out: int, d_in: int, in_ch: int | None, path: Path
) -> Magnitude:
    """LyCORIS' ``dora_scale`` as a :class:`Magnitude`.

    ``(out, 1, …)`` is ``wd_on_out=True``: one norm per output row. ``(1, C, …)`` is
    ``wd_on_out=False``: one norm per input channel over ``(out, kh, kw)``, i.e. per group of
    ``d_in / C`` consecutive columns of the flattened kernel (``C = d_in`` for a Linear). The
    two read the same when ``d_out == 1`` and ``C == 1`` (the norm covers the same entries).
    """
    key, ds = stored
    if ds.ndim < 2 or any(int(k) != 1 for k in ds.shape[2:]):
        raise ShapeError(
            f"{path}: {key} has shape {shape(ds)}; LyCORIS stores (out, 1, …) or (1, in, …)"
        )
    rows, cols = int(ds.shape[0]), int(ds.shape[1])
    eps = torch.finfo(torch.promote_types(ds.dtype, torch.float32)).eps
    if rows == d_out and cols == 1:
        return Magnitude(ds.reshape(-1), "out", key, eps=float(eps))
    fits = rows == 1 and (
        cols == in_ch if in_ch is not None else (d_in % cols == 0 and (ds.ndim > 2 or cols == d_in))
    )
    if not fits:
        raise ShapeError(
            f"{path}: {key} has shape {shape(ds)}, which is neither (out, 1, …) nor (1, in, …) "
            f"for an update of shape ({d_out}, {d_in})"
        )
    return Magnitude(ds.reshape(-1), "in", key, eps=float(eps))


# ----------------------------------------------------------------------------- writer

# Metadata that hashes the old tensors (sd-scripts' sshs_model_hash / sshs_legacy_hash): stale.
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash")


def _kohya_alpha(m: LoraModule) -> float:
    """The alpha with ``alpha / r = m.scale`` (``m.alpha`` itself when it gives that scale)."""
    if m.alpha is not None and abs(m.alpha / m.rank - m.scale) <= 1e-12 * abs(m.scale):
        return float(m.alpha)
    return float(m.scale) * m.rank


def _alpha_tensor(alpha: float, like: torch.Tensor | None) -> torch.Tensor:
    """A 0-d tensor holding ``alpha`` exactly: the template's dtype, else float32, else float64
    (so that ``alpha / r`` reads back as the scale that was written)."""
    for dtype in ((like.dtype,) if like is not None else ()) + (torch.float32, torch.float64):
        if dtype.is_floating_point:
            t = torch.tensor(alpha, dtype=dtype)
            if float(t) == alpha:
                return t
    return torch.tensor(alpha, dtype=torch.float64)


def _uniform(values: list[float]) -> str | None:
    """sd-scripts' text for one dim/alpha shared by ``values``, ``"Dynamic"`` when they differ
    (as its ``resize_lora.py`` writes), ``None`` when there are none."""
    if not values:
        return None
    if len(set(values)) > 1:
        return "Dynamic"
    v = values[0]
    return str(int(v)) if float(v).is_integer() else str(float(v))


def _metadata(
    metadata: dict[str, str], linear: list[LoraModule], conv: list[LoraModule]
) -> dict[str, str]:
    """The input's metadata with ``ss_network_dim``/``ss_network_alpha`` (linear and 1x1 conv
    modules) and ``conv_dim``/``conv_alpha`` in ``ss_network_args`` (3x3 conv modules) rewritten
    where present, and the stale tensor hashes dropped."""
    meta = {k: str(v) for k, v in metadata.items() if k not in _STALE_METADATA}
    dim, alpha = _uniform([m.rank for m in linear]), _uniform([_kohya_alpha(m) for m in linear])
    if "ss_network_dim" in meta and dim is not None:
        meta["ss_network_dim"] = dim
    if "ss_network_alpha" in meta and alpha is not None:
        meta["ss_network_alpha"] = alpha
    try:
        args = json.loads(meta.get("ss_network_args", ""))
    except json.JSONDecodeError:
        args = None
    if isinstance(args, dict) and conv:
        if "conv_dim" in args:
            args["conv_dim"] = _uniform([m.rank for m in conv])
        if "conv_alpha" in args:
            args["conv_alpha"] = _uniform([_kohya_alpha(m) for m in conv])
        meta["ss_network_args"] = json.dumps(args)
    return meta


def write_kohya(
    modules: Iterable[LoraModule],
    path: str | Path,
    *,
    template: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write modules as an sd-scripts LoRA ``.safetensors`` file (what :func:`read_kohya` reads).

    Per module ``<name>`` (a kohya name such as ``lora_unet_..._to_q``, no dots)::

        <name>.lora_down.weight   (k, d_in)  or conv (k, in, kh, kw)
        <name>.lora_up.weight     (d_out, k) or conv (d_out, k, 1, 1)
        <name>.alpha              0-d, alpha = scale·k, so sd-scripts' alpha / k is the scale

    and sd-scripts merges ``ΔW = up @ down · alpha / k`` (conv: the same product on the
    flattened kernel, ``networks/lora.py``), which is ``module.delta()``.

    Parameters
    ----------
    modules : iterable of LoraModule
        ``A`` ``(k, d_in)`` (conv: ``(k, in·kh·kw)``), ``B`` ``(d_out, k)``, in their dtypes.
    path : str or Path
        The file to write (replaced if it exists: callers write to a fresh path).
    template : dict of str to torch.Tensor, optional
        The tensors of the kohya file the modules came from. Its key spellings are kept
        (``lora_down.weight`` or the older ``lora.down.weight``); a module written replaces all
        of its template tensors (a LoHa/LoKr/Tucker module becomes a ``lora_down``/``lora_up``
        pair), and conv factors get the kernel shape its tensors show (see :func:`_kernel`:
        LyCORIS' flattened LoHa/LoKr conv factors do not show one, and are written as
        matrices); tensors of modules not written are copied unchanged. Without one, every
        module is written as a Linear pair.
    metadata : dict of str to str, optional
        The input's safetensors metadata: kept, with ``ss_network_dim``/``ss_network_alpha``
        (and ``conv_dim``/``conv_alpha`` in ``ss_network_args``) set to the new rank and alpha,
        or ``"Dynamic"`` when modules differ, as sd-scripts' ``resize_lora.py`` does; the
        ``sshs_*`` hashes of the old tensors are dropped.

    Raises
    ------
    FormatError
        A part of a fused projection, a DoRA module, a module name with dots that is not from a
        kohya file, or an unwritable path. ``ShapeError`` when a template kernel does not fit
        the factors; ``NonFiniteError`` for NaN/Inf.
    """
    path = Path(path)
    template = template or {}
    tensors: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    linear: list[LoraModule] = []
    conv: list[LoraModule] = []
    for m in modules:
        if m.part is not None:
            raise FormatError(
                f"{m.tensor_name()}: {m.key} is a part of a fused projection; kohya files hold "
                "whole modules (write a .h5 file instead)"
            )
        if m.magnitude is not None:
            raise FormatError(
                f"{m.tensor_name()}: a DoRA module; its magnitude would be lost in a "
                "lora_down/lora_up pair (write a .h5 file instead)"
            )
        kd, ku = _factor_keys(m, path)
        A, B = m.A.detach().to("cpu"), m.B.detach().to("cpu")  # (k, d_in), (d_out, k)
        kernel = _kernel(m.name, template)
        if kernel is not None:  # conv: (in, kh, kw) as the file had it
            if math.prod(kernel) != m.d_in:
                raise ShapeError(
                    f"{path}: {kd}: the template's kernel {kernel} does not fit "
                    f"factors of {m.d_in} inputs"
                )
            A = A.reshape(m.rank, *kernel)  # (k, in·kh·kw) -> (k, in, kh, kw)
            B = B.reshape(m.d_out, m.rank, *(1,) * (len(kernel) - 1))  # -> (out, k, 1, 1)
        is_conv = kernel is not None and any(k != 1 for k in kernel[1:])
        (conv if is_conv else linear).append(m)  # sd-scripts: conv_dim for kernels, else dim
        for key, t in ((kd, A), (ku, B)):
            check_finite(t, path, key)
            tensors[key] = t.contiguous()
        alpha_key = f"{m.name}.alpha"
        tensors[alpha_key] = _alpha_tensor(_kohya_alpha(m), template.get(alpha_key))
        written.add(m.name)
    if not written:
        raise FormatError(f"{path}: no modules to write")
    for key, t in template.items():  # modules lorascope does not model are copied as they were
        match = _KEY_RE.match(key)
        if key not in tensors and not (match and match["name"] in written):
            tensors[key] = t
    try:
        save_safetensors(tensors, path, metadata=_metadata(dict(metadata or {}), linear, conv))
    except (OSError, TypeError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path}: cannot write the kohya file: {one_line(e)}") from None


def _kernel(name: str, template: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """``(in, kh, kw)`` of module ``name``'s conv kernel, as its tensors in ``template`` show
    it, or None (a Linear, or a LoHa/LoKr whose conv factor LyCORIS stored flattened to
    ``(r, in·kh·kw)``, which does not say where ``in`` ends: written as a matrix then).

    LoRA ``lora_down`` ``(r, in, kh, kw)`` (Tucker: ``in`` from it, the kernel from
    ``lora_mid``); LoHa Tucker ``hada_t1`` and ``hada_w1_b`` ``(r, in)``; LoKr ``in = c·d``
    from ``lokr_w1[_b]`` ``(·, c)`` and ``lokr_w2`` ``(b, d, kh, kw)`` or ``lokr_t2`` with
    ``lokr_w2_b`` ``(r, d)``.
    """

    def get(suffix: str) -> torch.Tensor | None:
        return template.get(f"{name}.{suffix}")

    down = next((t for t in map(get, _DOWN) if t is not None), None)
    mid = get(_MID)
    if down is not None and down.ndim >= 3:
        if mid is not None:
            return (int(down.shape[1]), *(int(k) for k in mid.shape[2:]))
        return tuple(int(k) for k in down.shape[1:])
    w1b, t1 = get("hada_w1_b"), get("hada_t1")
    if w1b is not None and t1 is not None:
        return (int(w1b.shape[1]), *(int(k) for k in t1.shape[2:]))
    if w1b is not None and w1b.ndim >= 3:
        return tuple(int(k) for k in w1b.shape[1:])
    w1 = next((t for t in map(get, ("lokr_w1", "lokr_w1_b")) if t is not None), None)
    if w1 is None:
        return None
    c = int(w1.shape[1])
    w2, w2b, t2 = get("lokr_w2"), get("lokr_w2_b"), get("lokr_t2")
    if w2 is not None and w2.ndim >= 3:
        return (c * int(w2.shape[1]), *(int(k) for k in w2.shape[2:]))
    if w2b is not None and t2 is not None:
        return (c * int(w2b.shape[1]), *(int(k) for k in t2.shape[2:]))
    if w2b is not None and w2b.ndim >= 3:
        return (c * int(w2b.shape[1]), *(int(k) for k in w2b.shape[2:]))
    return None


def _factor_keys(m: LoraModule, path: Path) -> tuple[str, str]:
    """The down/up keys of ``m``: the spellings of the file it came from, or sd-scripts' own."""
    if len(m.keys) >= 2:
        kd, ku = m.keys[0], m.keys[1]
        md, mu = _KEY_RE.match(kd), _KEY_RE.match(ku)
        if (
            md is not None
            and mu is not None
            and md["name"] == mu["name"] == m.name
            and md["suffix"] in _DOWN
            and mu["suffix"] == _UP[_DOWN.index(md["suffix"])]
        ):
            return kd, ku
    if "." in m.name:
        raise FormatError(
            f"{m.tensor_name()}: {m.name} is not a kohya module name (kohya names have no dots, "
            "e.g. lora_unet_..._to_q); write PEFT or a .h5 file instead"
        )
    return f"{m.name}.lora_down.weight", f"{m.name}.lora_up.weight"


# ----------------------------------------------------------------------------- layout


def _claims(probe: Probe) -> bool:
    return probe.container in ("safetensors", "torch", "unknown") and any(
        is_kohya_key(k) for k in probe.keys
    )


def _read(probe: Probe, options: ReadOptions) -> Adapter:
    tensors, metadata = probe.tensors()
    return read_kohya(
        probe.path,
        tensors=tensors,
        metadata=metadata,
        alpha=options.alpha,
        fan_in_fan_out=options.fan_in_fan_out,
    )


LAYOUT = (
    "kohya",
    _claims,
    _read,
    "sd-scripts / LyCORIS: lora_down/lora_up/alpha (Tucker lora_mid), hada_*, lokr_*, dora_scale",
)
