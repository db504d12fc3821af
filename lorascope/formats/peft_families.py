"""PEFT's other additive families, read into their exact factored forms: AdaLoRA, VeRA, LoHa,
LoKr (peft 0.21, ``tuners/adalora``, ``tuners/vera``, ``tuners/loha``, ``tuners/lokr``).

The layout (keys, ``adapter_config.json``, rank/alpha patterns, what is refused) is
:mod:`lorascope.formats.peft`'s; each reader here takes its context and the file's tensors and
returns the modules, built with :mod:`lorascope.families` in float64.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorascope.errors import FormatError, ShapeError
from lorascope.families import (
    full_as_factors,
    hadamard_factors,
    kron_factors,
    row_scale,
    tucker_factors,
)
from lorascope.formats._common import check_tensors, make_module, shape, warn
from lorascope.formats.peft import (
    _collect,
    _Ctx,
    _numel,
    _require,
    config_int,
    config_number,
    read_pattern,
)

__all__ = ["read_adalora", "read_vera", "read_loha", "read_lokr"]

_ADALORA_PARAMS = ("lora_A", "lora_B", "lora_E")
_VERA_PARAMS = ("vera_lambda_b", "vera_lambda_d")
_VERA_SHARED = ("vera_A", "vera_B")
_LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_ADALORA_EPS = 1e-5  # peft SVDLinear.get_delta_weight: scaling / (ranknum + 1e-5)


# ----------------------------------------------------------------------------- AdaLoRA


def read_adalora(ctx: _Ctx, tensors: dict[str, torch.Tensor]):
    """AdaLoRA (peft ``tuners/adalora``): ``ΔW = B (E ⊙ A) · α / (ranknum + 1e-5)``.

    ``SVDLinear``/``SVDConv2d.get_delta_weight``; ``E`` ``(k, 1)`` scales the rows of ``A``
    (``k`` the rank kept by the budget: the saved tensors are already pruned,
    ``resize_state_dict_by_rank_pattern``). ``ranknum`` is not saved: ``PeftModel.from_pretrained``
    rebuilds each module at its kept rank and copies the creation-time ranknum back
    (``resize_modules_by_rank_pattern``), so ranknum = ``init_r``, and ``scaling = lora_alpha``
    (``float(k)`` when ``lora_alpha <= 0``). LoRA's rsLoRA and rank/alpha patterns do not apply;
    ``rank_pattern`` holds the boolean masks of the kept ranks, checked against the tensors.
    Modules pruned to rank 0 have ΔW = 0 and are left out (``config["pruned_modules"]``).
    """
    cfg, src, weights = ctx.config, ctx.config_path, ctx.weights
    init_r = config_int(cfg, "init_r", 12, src)
    lora_alpha = (
        float(ctx.alpha)
        if ctx.alpha is not None
        else float(config_number(cfg, "lora_alpha", 8, src, positive=False))
    )
    masks = cfg.get("rank_pattern") or {}
    if not isinstance(masks, dict):
        raise FormatError(f"{src}: rank_pattern should be a JSON object of kept-rank masks")
    groups, full = _collect(ctx, tensors, _ADALORA_PARAMS)
    modules, pruned = [], []
    for name, p in groups.items():
        _require(ctx, name, p, _ADALORA_PARAMS, "AdaLoRA")
        (ka, A), (kb, B), (ke, E) = p["lora_A"], p["lora_B"], p["lora_E"]
        if (
            A.ndim != 2
            or B.ndim != 2
            or B.shape[1] != A.shape[0]
            or tuple(E.shape) != (A.shape[0], 1)
        ):
            raise ShapeError(
                f"{weights}: {ka} {shape(A)}, {ke} {shape(E)} and {kb} {shape(B)} do not form "
                "B (E ⊙ A) (expected (k, in), (k, 1) and (out, k))"
            )
        k = int(A.shape[0])
        mask, mask_key = _adalora_mask(masks, name, init_r, src)
        expected = sum(bool(b) for b in mask) if mask is not None else init_r
        if k != expected:
            where = f"rank_pattern[{mask_key!r}] keeps" if mask is not None else "init_r is"
            raise ShapeError(f"{weights}: {ke} has rank {k} but {src.name}: {where} {expected}")
        if k == 0:  # pruned to rank 0 by the budget: ΔW = 0
            pruned.append(name)
            continue
        check_tensors({ka: A, ke: E, kb: B}, weights)
        A2 = row_scale(E.double().reshape(-1), A.double())  # (k, in): E scales A's rows
        scaling = lora_alpha if lora_alpha > 0 else float(k)
        modules.append(
            make_module(
                name,
                A2,
                B.double(),
                alpha=lora_alpha,
                scale=scaling / (init_r + _ADALORA_EPS),
                source=weights,
                keys=(ka, kb, ke),
                fan_in_fan_out=ctx.ffo_for(),
                family="adalora",
                nominal_rank=k,
                n_params=_numel(p),
            )
        )
    if pruned and not modules:
        raise FormatError(
            f"{weights}: every AdaLoRA module ({len(pruned)}) was pruned to rank 0: ΔW is zero"
        )
    if pruned:
        warn(
            weights,
            f"{len(pruned)} AdaLoRA module(s) pruned to rank 0 (ΔW = 0) left out, e.g. "
            f"{pruned[0]} (config['pruned_modules'] lists them)",
        )
    return modules, full, {"pruned_modules": pruned}


def _adalora_mask(masks: dict, name: str, init_r: int, src: Path) -> tuple[list | None, str]:
    """The kept-rank mask of module ``name`` (saved key ``<name>.lora_E``; an unsaved config may
    still carry the adapter name, ``<name>.lora_E.<adapter>``)."""
    stem = f"{name}.lora_E"
    key = stem if stem in masks else None
    if key is None:
        key = next(
            (k for k in masks if k.startswith(stem + ".") and k.count(".") == stem.count(".") + 1),
            None,
        )
    if key is None:
        return None, ""
    mask = masks[key]
    if (
        not isinstance(mask, list)
        or len(mask) != init_r
        or not all(isinstance(b, bool) or b in (0, 1) for b in mask)
    ):
        raise FormatError(
            f"{src}: rank_pattern[{key!r}] should be a list of init_r={init_r} booleans "
            "(the ranks AdaLoRA kept)"
        )
    return mask, key


# ----------------------------------------------------------------------------- VeRA


def read_vera(ctx: _Ctx, tensors: dict[str, torch.Tensor]):
    """VeRA (peft ``tuners/vera``): ``ΔW = diag(λ_b) vera_B[:out] · diag(λ_d) vera_A[:, :in]``.

    ``vera.layer.Linear.get_delta_weight``: no scaling; the shared frozen projections
    ``base_model.vera_A`` ``(r, max_in)`` and ``base_model.vera_B`` ``(max_out, r)`` are sliced
    to each layer's leading ``in``/``out``. ``out`` is ``len(λ_b)``; ``in`` is not in the file
    (``in_features`` must come from the base model).
    """
    cfg, src, weights = ctx.config, ctx.config_path, ctx.weights
    if ctx.alpha is not None:
        raise FormatError(f"{weights}: VeRA has no alpha (its update is not scaled); drop it")
    r = config_int(cfg, "r", 256, src)
    groups, full = _collect(ctx, tensors, _VERA_PARAMS + _VERA_SHARED)
    shared = groups.pop("base_model", {})
    for p in groups.values():
        for param, (key, _t) in p.items():
            if param in _VERA_SHARED:
                raise FormatError(
                    f"{weights}: {key}: a per-layer projection; peft saves only the shared "
                    "base_model.vera_A / base_model.vera_B"
                )
    if "vera_A" not in shared or "vera_B" not in shared:
        raise FormatError(
            f"{weights}: no base_model.vera_A / base_model.vera_B (saved with "
            f"save_projection=false): peft regenerates them from projection_prng_key="
            f"{cfg.get('projection_prng_key')} with the base model's layer sizes (not supported)"
        )
    (k_a, VA), (k_b, VB) = shared["vera_A"], shared["vera_B"]
    if VA.ndim != 2 or VB.ndim != 2 or VA.shape[0] != r or VB.shape[1] != r:
        raise ShapeError(
            f"{weights}: {k_a} {shape(VA)} and {k_b} {shape(VB)} are not (r, max_in) and "
            f"(max_out, r) with r={r}"
        )
    if ctx.in_features is None:
        raise FormatError(
            f"{weights}: VeRA slices the shared {k_a} {shape(VA)} to each layer's in_features, "
            "which only the base model records; give the base (CLI: --sizes-from BASE)"
        )
    check_tensors({k_a: VA, k_b: VB}, weights)
    VA64, VB64 = VA.double(), VB.double()
    modules, max_out, max_in = [], 0, 0
    for name, p in groups.items():
        _require(ctx, name, p, _VERA_PARAMS, "VeRA")
        (kb, lb), (kd, ld) = p["vera_lambda_b"], p["vera_lambda_d"]
        if lb.ndim != 1 or ld.ndim != 1 or ld.shape[0] != r or lb.shape[0] > VB.shape[0]:
            raise ShapeError(
                f"{weights}: {kb} {shape(lb)} and {kd} {shape(ld)} are not (out,) and (r,) with "
                f"r={r}, out <= {VB.shape[0]}"
            )
        d_in = ctx.in_features.get(name)
        if d_in is None:
            raise FormatError(f"{weights}: no in_features given for VeRA module {name}")
        if isinstance(d_in, bool) or not isinstance(d_in, int) or not 0 < d_in <= VA.shape[1]:
            raise ShapeError(
                f"{weights}: in_features={d_in!r} for {name} does not fit {k_a} {shape(VA)}"
            )
        check_tensors({kb: lb, kd: ld}, weights)
        d_out = int(lb.shape[0])
        max_out, max_in = max(max_out, d_out), max(max_in, d_in)
        B2 = row_scale(lb.double(), VB64[:d_out])  # (out, r): λ_b scales vera_B's rows
        A2 = row_scale(ld.double(), VA64[:, :d_in])  # (r, in): λ_d scales vera_A's rows
        modules.append(
            make_module(
                name,
                A2,
                B2,
                alpha=None,
                scale=1.0,
                source=weights,
                keys=(kd, kb, k_a, k_b),
                fan_in_fan_out=ctx.ffo_for(),
                family="vera",
                nominal_rank=r,
                n_params=_numel(p),
            )
        )
    if modules and (max_out, max_in) != (VB.shape[0], VA.shape[1]):
        raise ShapeError(
            f"{weights}: the layers reach (out, in) = ({max_out}, {max_in}) but peft sized "
            f"{k_b} / {k_a} to the largest targeted layer, ({VB.shape[0]}, {VA.shape[1]}): "
            "wrong in_features, or a file that lost modules"
        )
    return modules, full, {}


# ----------------------------------------------------------------------------- LoHa, LoKr


def _lycoris_options(ctx: _Ctx) -> tuple[int, float, dict, dict]:
    """``r``, ``alpha`` (LycorisConfig's field names) and their patterns; ``s = alpha / r``
    always (``LoHaLayer``/``LoKrLayer.update_layer``), no rsLoRA."""
    cfg, src = ctx.config, ctx.config_path
    return (
        config_int(cfg, "r", 8, src),
        config_number(cfg, "alpha", 8, src),
        read_pattern(cfg, "rank_pattern", src),
        read_pattern(cfg, "alpha_pattern", src),
    )


def read_loha(ctx: _Ctx, tensors: dict[str, torch.Tensor]):
    """LoHa (peft ``tuners/loha``): ``ΔW = (alpha/r) · (W1a W1b) ⊙ (W2a W2b)``.

    ``LoHaLayer.get_delta_weight`` → ``make_weight`` (flat: ``hada_w_a (out, r)``,
    ``hada_w_b (r, in·K)``) or ``make_weight_cp`` (conv with ``use_effective_conv2d``:
    ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`` with ``hada_w_a (r, out)``,
    ``hada_w_b (r, in)``, which is :func:`~lorascope.families.tucker_factors`). Each term is
    ``P Q``; the Hadamard product is ``face_split(P1, P2) @ khatri_rao(Q1, Q2)``, width r².
    """
    weights = ctx.weights
    r_default, alpha_default, ranks, alphas = _lycoris_options(ctx)
    groups, full = _collect(ctx, tensors, _LOHA_PARAMS)
    modules = []
    for name, p in groups.items():
        r, alpha, where = ctx.r_alpha(name, r_default, alpha_default, ranks, alphas)
        cp = "hada_t1" in p or "hada_t2" in p
        _require(ctx, name, p, _LOHA_PARAMS if cp else _LOHA_PARAMS[:4], "LoHa")
        check_tensors({k: t for k, t in p.values()}, weights)
        f = {param: t.double() for param, (_k, t) in p.items()}
        terms = []
        for i in (1, 2):
            (ka, _), (kb, _) = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
            a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
            if cp:
                t = f[f"hada_t{i}"]
                if (
                    t.ndim < 3
                    or a.ndim != 2
                    or b.ndim != 2
                    or (a.shape[0], b.shape[0]) != t.shape[:2]
                ):
                    raise ShapeError(
                        f"{weights}: {p[f'hada_t{i}'][0]} {shape(t)}, {ka} {shape(a)} and {kb} "
                        f"{shape(b)} do not form a Tucker factor (expected (r, r, kh, kw), "
                        "(r, out), (r, in))"
                    )
                P, Q = tucker_factors(t, b, a)  # (out, r), (r, in·kh·kw)
            else:
                if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                    raise ShapeError(
                        f"{weights}: {ka} {shape(a)} and {kb} {shape(b)} do not form a product"
                    )
                P, Q = a, b
            if P.shape[1] != r:
                raise ctx.rank_error(ka, int(P.shape[1]), where, r, name)
            terms.append((P, Q))
        (P1, Q1), (P2, Q2) = terms
        if P1.shape[0] != P2.shape[0] or Q1.shape[1] != Q2.shape[1]:
            raise ShapeError(
                f"{weights}: {name}: the two Hadamard terms have different shapes "
                f"({P1.shape[0]}, {Q1.shape[1]}) and ({P2.shape[0]}, {Q2.shape[1]})"
            )
        B, A = hadamard_factors(P1, Q1, P2, Q2)  # (out, r²), (r², in·K)
        keys = (p["hada_w1_b"][0], p["hada_w1_a"][0], *(k for k, _t in p.values()))
        modules.append(
            make_module(
                name,
                A,
                B,
                alpha=alpha,
                scale=alpha / r,
                source=weights,
                keys=tuple(dict.fromkeys(keys)),
                fan_in_fan_out=ctx.ffo_for(),
                family="loha",
                nominal_rank=r,
                n_params=_numel(p),
            )
        )
    return modules, full, {}


def read_lokr(ctx: _Ctx, tensors: dict[str, torch.Tensor]):
    """LoKr (peft ``tuners/lokr``): ``ΔW = (alpha/r) · kron(w1, w2)``, reshaped to the weight.

    ``LoKrLayer.get_delta_weight`` → ``make_kron``: ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``
    (the left factor); ``w2 = lokr_w2`` (full, ``(b, d)`` or a kernel ``(b, d, kh, kw)``, then
    ``w1`` is unsqueezed to ``(a, c, 1, 1)``), ``lokr_w2_a @ lokr_w2_b`` (``(r, d·K)`` flat), or
    the Tucker ``make_weight_cp(lokr_t2, lokr_w2_a (r, b), lokr_w2_b (r, d))``. Each factor is
    ``P Q`` (a full one as ``(I, W)`` or ``(W, I)``) and ``kron(P1 Q1, P2 Q2) =
    kron(P1, P2) kron(Q1, Q2)`` (:func:`~lorascope.families.kron_factors`), with ``w2``
    flattened to ``(b, d·K)``. The scale is ``alpha/r`` even when both factors are full.
    A Conv1d with a full 3-D ``lokr_w2`` lays ΔW out differently (:func:`_kron_conv1d`).
    """
    weights = ctx.weights
    r_default, alpha_default, ranks, alphas = _lycoris_options(ctx)
    groups, full = _collect(ctx, tensors, _LOKR_PARAMS)
    modules = []
    for name, p in groups.items():
        r, alpha, where = ctx.r_alpha(name, r_default, alpha_default, ranks, alphas)
        _lokr_check_forms(ctx, name, p)
        check_tensors({k: t for k, t in p.values()}, weights)
        f = {param: t.double() for param, (_k, t) in p.items()}
        low_rank: list[tuple[str, int]] = []  # (key, width) of each low-rank factor, = r
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
            if w1.ndim != 2:
                raise ShapeError(f"{weights}: {p['lokr_w1'][0]} has shape {shape(w1)}, not (a, c)")
            P1, Q1 = full_as_factors(w1)
        else:
            P1, Q1 = _lokr_pair(ctx, p, "lokr_w1_a", "lokr_w1_b")
            low_rank.append((p["lokr_w1_a"][0], int(P1.shape[1])))
        conv1d_full = None
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
            if w2.ndim not in (2, 3, 4):
                raise ShapeError(f"{weights}: {p['lokr_w2'][0]} has shape {shape(w2)}")
            if w2.ndim == 3:
                conv1d_full = (int(w2.shape[1]), int(w2.shape[2]))  # (d, k)
            P2, Q2 = full_as_factors(w2.reshape(w2.shape[0], -1))  # (b, d·K)
        elif "lokr_t2" in f:
            t, a, b = f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]
            if t.ndim != 4 or a.ndim != 2 or b.ndim != 2 or (a.shape[0], b.shape[0]) != t.shape[:2]:
                raise ShapeError(
                    f"{weights}: {p['lokr_t2'][0]} {shape(t)}, {p['lokr_w2_a'][0]} {shape(a)} "
                    f"and {p['lokr_w2_b'][0]} {shape(b)} do not form a Tucker factor (expected "
                    "(r, r, kh, kw), (r, b), (r, d))"
                )
            P2, Q2 = tucker_factors(t, b, a)  # (b, r), (r, d·kh·kw)
            low_rank.append((p["lokr_t2"][0], int(t.shape[0])))
        else:
            P2, Q2 = _lokr_pair(ctx, p, "lokr_w2_a", "lokr_w2_b")
            low_rank.append((p["lokr_w2_a"][0], int(P2.shape[1])))
        for key, width in low_rank:
            if width != r:
                raise ctx.rank_error(key, width, where, r, name)
        if conv1d_full is not None:
            B, A = _kron_conv1d(P1, Q1, P2, Q2, *conv1d_full)
        else:
            B, A = kron_factors(*_packed(P1, Q1, P2, Q2))  # (a·b, k1·k2), (k1·k2, c·d·K)
        modules.append(
            make_module(
                name,
                A,
                B,
                alpha=alpha,
                scale=alpha / r,
                source=weights,
                keys=tuple(k for k, _t in p.values()),
                fan_in_fan_out=ctx.ffo_for(),
                family="lokr",
                nominal_rank=r,
                n_params=_numel(p),
            )
        )
    return modules, full, {}


def _lokr_check_forms(ctx: _Ctx, name: str, p: dict) -> None:
    """One whole or low-rank form of each Kronecker factor (peft
    ``LoKrLayer.create_adapter_parameters``)."""
    w1 = ("lokr_w1" in p, "lokr_w1_a" in p and "lokr_w1_b" in p)
    w2 = ("lokr_w2" in p, "lokr_w2_a" in p and "lokr_w2_b" in p)
    loose = [x for x in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b") if x in p]
    if (
        sum(w1) != 1
        or sum(w2) != 1
        or ("lokr_t2" in p and not w2[1])
        or ("lokr_w1" in p and any(x.startswith("lokr_w1_") for x in loose))
        or ("lokr_w2" in p and any(x.startswith("lokr_w2_") for x in loose))
    ):
        have = ", ".join(p)
        raise ShapeError(
            f"{ctx.weights}: {name} stores {have}: not one whole or low-rank form of each "
            "Kronecker factor (lokr_w1 or lokr_w1_a/_b; lokr_w2, lokr_w2_a/_b or +lokr_t2)"
        )


def _lokr_pair(ctx: _Ctx, p: dict, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    (ka, a), (kb, b) = p[a_name], p[b_name]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(
            f"{ctx.weights}: {ka} {shape(a)} and {kb} {shape(b)} do not form a product"
        )
    return a.double(), b.double()


def _kron_conv1d(
    P1: torch.Tensor, Q1: torch.Tensor, P2: torch.Tensor, Q2: torch.Tensor, d: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of peft's LoKr Conv1d with a full 3-D ``lokr_w2`` ``(b, d, k)``.

    ``make_kron`` calls ``torch.kron(w1 (a, c), w2 (b, d, k))``, which pads ``w1`` to
    ``(1, a, c)`` and gives ``(b, a·d, c·k)``; reshaped to the weight ``(a·b, c·d, k)`` that is
    ``ΔW[x·a + i, y·c + j, t] = w1[i, j] · w2[x, y, t]``: ``w2`` is the outer factor and the
    kernel tap the innermost column index. So ``B' = kron(P2, P1)`` and ``A'`` is
    ``kron(Q2, Q1)`` ``(k2·k1, (d·k)·c)`` with its columns reordered from ``(y, t, j)`` to
    ``(y, j, t)``.

    Parameters
    ----------
    P1, Q1 : torch.Tensor
        ``(a, k1)``, ``(k1, c)``: ``w1``.
    P2, Q2 : torch.Tensor
        ``(b, k2)``, ``(k2, d·k)``: ``w2`` flattened.
    """
    B, A = kron_factors(*_packed(P2, Q2, P1, Q1))  # (b·a, k2·k1), (k2·k1, (d·k)·c)
    n, c = A.shape[0], Q1.shape[1]
    A = A.reshape(n, d, k, c).transpose(2, 3).reshape(n, d * c * k)  # column (y·c + j)·k + t
    return B, A


def _packed(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-major copies. ``torch.kron`` views its inputs and fails on a tensor that
    ``is_contiguous()`` but has an odd stride on a size-1 dimension (a transposed ``(1, n)``,
    e.g. a Tucker factor ``upᵀ`` at r = 1), which ``.contiguous()`` leaves as it is."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in ts)
