"""Training-time tracking (lorascope.tracking): every recorded number against a dense recomputation.

The real ``transformers.Trainer`` trains a tiny Llama built from a config (no downloads) wrapped
by the real ``peft.get_peft_model`` (rsLoRA, rank and alpha patterns: every module has its own r
and scale; DoRA), with :class:`LoraScopeCallback` and a checkpoint saved by peft every 2 steps.
Each tracked value is checked against numpy on the checkpoint saved at the same step: dense
``np.linalg.svd`` of ``s·B A`` (s from ``adapter_config.json`` by peft's rules, worked out here),
``scipy.linalg.subspace_angles``, the frozen base weights copied before peft wrapped them. The
same for ``lorascope.train(track_every=...)``, for a custom loop with lorascope's and loralib's
layers, and for files left behind by processes killed with SIGKILL mid-run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import build_tiny_llama
from safetensors.numpy import load_file
from torch import nn

from lorascope.analysis.compare import compare, settle
from lorascope.errors import FormatError, LoraScopeError, LoraScopeWarning
from lorascope.formats import load_adapter
from lorascope.tracking import Tracker, dynamics, live_modules, read_run, settling_curve
from lorascope.train import LoRALinear, MergedLoRALinear, inject

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj")
RANK_PATTERN = {"layers.1.self_attn.q_proj": 8, "k_proj": 2}
ALPHA_PATTERN = {"layers.0.self_attn.v_proj": 3.0}
RTOL_SIGMA = 1e-10  # the target: recorded σ = dense SVD of the saved factors to 1e-10


# ------------------------------------------------------------------------ dense references


def _dense(A: np.ndarray, B: np.ndarray, s: float):
    """``ΔW = s·B A`` in float64 and its dense SVD ``U (d_out, p), S (p,), Vh (p, d_in)``."""
    D = s * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    return D, U, S, Vh


def _phi(V1: np.ndarray, V2: np.ndarray) -> float:
    """Hu et al. 2021 eq. 4 for i = j: mean cos² of the principal angles (scipy)."""
    return float(np.mean(np.cos(scipy.linalg.subspace_angles(V1, V2)) ** 2))


def _grassmann(V1: np.ndarray, V2: np.ndarray) -> float:
    return float(np.sqrt(np.sum(scipy.linalg.subspace_angles(V1, V2) ** 2)))


def _well_separated(S: np.ndarray, i: int) -> bool:
    """The top-i subspace is well defined (σ_i clearly above σ_{i+1})."""
    nxt = S[i] if i < S.size else 0.0
    return (S[i - 1] - nxt) > 1e-6 * S[0]


def _energy_k(S: np.ndarray, e: float) -> int | None:
    """Smallest k with Σ_{<=k} σ² >= e·Σ σ² (None when a cumulative share is a hair from e,
    where rounding may decide)."""
    share = np.cumsum(S**2) / np.sum(S**2)
    if np.any(np.abs(share - e) < 1e-9):
        return None
    return int(np.argmax(share >= e)) + 1


def _pattern(name: str, patterns: dict, default):
    """peft's rule: a pattern key matches a module whose name is the key or ends in '.key'."""
    for key, v in patterns.items():
        if name == key or name.endswith("." + key):
            return v
    return default


def _peft_scale(name: str, cfg: dict) -> tuple[int, float]:
    """``(r, s)`` of module ``name`` from an ``adapter_config.json``: patterns, then
    ``alpha/√r`` (rsLoRA) or ``alpha/r``."""
    r = int(_pattern(name, cfg.get("rank_pattern") or {}, cfg["r"]))
    alpha = float(_pattern(name, cfg.get("alpha_pattern") or {}, cfg["lora_alpha"]))
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _checkpoint(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """``{module name: (A, B)}`` and the config of a peft adapter directory, read with
    safetensors and json only."""
    t = load_file(path / "adapter_model.safetensors")
    cfg = json.loads((path / "adapter_config.json").read_text())
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")].removeprefix(PREFIX)
            out[name] = (t[k], t[k.replace(".lora_A.", ".lora_B.")])
    return out, cfg


def _index(run, step: int) -> int:
    (idx,) = np.nonzero(run.steps == step)[0]
    return int(idx)


def _factor_index(run, step: int) -> int:
    (idx,) = np.nonzero(run.factor_steps == step)[0]
    return int(idx)


def _assert_sigma(tracked: np.ndarray, dense: np.ndarray, r: int, what: str) -> None:
    assert np.all(np.isnan(tracked[r:])), f"{what}: values past the width {r}"
    np.testing.assert_allclose(tracked[:r], dense[:r], rtol=RTOL_SIGMA, atol=0, err_msg=what)


# ------------------------------------------------------------------------ the Trainer runs


def _train_peft(out: Path, lora_config, max_steps: int, **callback_options) -> SimpleNamespace:
    """Train the tiny Llama with peft + the real Trainer, tracked every 2 steps and saved
    (adapter only) every 2 steps."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from lorascope.tracking import LoraScopeCallback

    torch.manual_seed(0)
    model = build_tiny_llama().train()
    base = {  # the frozen weights, copied before peft wraps them: (d_out, d_in)
        n: m.weight.detach().to(torch.float64).numpy().copy()
        for n, m in model.named_modules()
        if n.endswith(TARGETS)
    }
    pm = get_peft_model(model, lora_config)
    ids = torch.randint(1, 64, (48, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]  # a random causal-LM task
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        save_only_model=True,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    cb = LoraScopeCallback(out / "tracking.h5", every=2, **callback_options)
    trainer = Trainer(model=pm, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    layers = {
        n.removeprefix(PREFIX): m
        for n, m in pm.named_modules()
        if isinstance(getattr(m, "scaling", None), dict)
    }
    ckpts = {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*")}
    return SimpleNamespace(
        out=out,
        run=read_run(out / "tracking.h5"),
        result=cb.result,
        base=base,
        layers=layers,
        ckpts=dict(sorted(ckpts.items())),
        log_history=trainer.state.log_history,
    )


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
    )
    return _train_peft(tmp_path_factory.mktemp("peft_run"), cfg, 12, factors_every=4)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_dora=True,
        rank_pattern={"q_proj": 3},
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
    )
    return _train_peft(tmp_path_factory.mktemp("dora_run"), cfg, 6)


# ---------------------------------------------------------- 1. Trainer + peft: σ at every step


def test_trainer_sigma_equals_dense_svd_of_each_checkpoint(peft_run):
    run = peft_run.run
    assert run.steps.tolist() == [2, 4, 6, 8, 10, 12]  # every=2, the final step once
    assert run.factor_steps.tolist() == [4, 8, 12]  # factors_every=4
    assert list(peft_run.ckpts) == run.steps.tolist()  # a peft checkpoint at every snapshot
    assert run.phi_final is not None  # the run ended: the settling curve is in the file
    assert len(peft_run.result) == len(run.modules)
    scales = set()
    for step, path in peft_run.ckpts.items():
        factors, cfg = _checkpoint(path)
        assert sorted(factors) == sorted(run.names)  # tracked names are the adapter's keys
        adapter = load_adapter(path)
        assert sorted(m.key for m in adapter) == sorted(run.names)
        t = _index(run, step)
        for m, meta in enumerate(run.modules):
            name = meta["name"]
            A, B = factors[name]
            r, s = _peft_scale(name, cfg)
            assert A.shape == (r, meta["d_in"]) and B.shape == (meta["d_out"], r)
            assert meta["rank"] == meta["nominal_rank"] == r
            assert meta["scale"] == pytest.approx(s, rel=1e-15)
            assert meta["scale"] == peft_run.layers[name].scaling["default"]  # what peft applies
            assert adapter[name].scale == pytest.approx(s, rel=1e-15)
            scales.add(round(s, 12))
            _, _, S, _ = _dense(A, B, s)
            assert S[0] > 0
            _assert_sigma(run.metrics["sigma"][t, m], S, r, f"step {step} {name}")
            # the same through lorascope's reader of the checkpoint
            lm = adapter[name]
            _, _, S2, _ = _dense(lm.A.numpy(), lm.B.numpy(), lm.scale)
            np.testing.assert_allclose(run.metrics["sigma"][t, m, :r], S2[:r], rtol=RTOL_SIGMA)
    assert len(scales) >= 4  # rsLoRA with rank and alpha patterns: the scales really differ


def test_trainer_stored_factors_are_the_checkpoint_tensors(peft_run):
    run = peft_run.run
    for t, step in enumerate(run.factor_steps.tolist()):
        factors, _ = _checkpoint(peft_run.ckpts[step])
        for m, name in enumerate(run.names):
            A, B = run.factors(m, t)
            assert A.dtype == factors[name][0].dtype == np.float32
            assert np.array_equal(A, factors[name][0]) and np.array_equal(B, factors[name][1])
    with pytest.raises(IndexError):
        run.factors(0, len(run.factor_steps))
    assert run.config["peft"]["default"]["use_rslora"] is True
    assert run.config["peft"]["default"]["rank_pattern"] == RANK_PATTERN
    assert bool(run.attrs["use_rslora"]) is True


def test_trainer_loss_is_the_loss_logged_at_that_step(peft_run):
    logged = {h["step"]: h["loss"] for h in peft_run.log_history if "loss" in h}
    run = peft_run.run
    for step, loss in zip(run.steps.tolist(), run.loss.tolist(), strict=True):
        assert loss == pytest.approx(logged[step], rel=1e-6), step


# ---------------------------------------------------------------- 2. settling curve, φ(i, i)


def test_settling_curve_equals_compare_settle_on_checkpoints(peft_run):
    run = peft_run.run
    fsteps = run.factor_steps.tolist()
    adapters = [load_adapter(peft_run.ckpts[s]) for s in fsteps]
    for k in (None, 2):
        ours = {d.module: d for d in dynamics(run, k=k)}
        theirs = settle(compare(adapters, k=k))
        assert sorted(ours) == sorted(s.module for s in theirs)
        for s in theirs:
            d = ours[s.module]
            assert d.i == s.i and d.factor_steps == fsteps
            np.testing.assert_allclose(d.phi_to_final, s.phi_to_final, rtol=0, atol=1e-10)
            if k is None:  # the file's Grassmann distance is over the module's width
                np.testing.assert_allclose(
                    d.grassmann_to_final, s.grassmann_to_final, rtol=0, atol=1e-7
                )
            assert d.settled_step == s.settled_step
    # the file's settling curve (written at close) is the one computed from its factors
    phi, dist = settling_curve(run)
    np.testing.assert_allclose(run.phi_final, phi, rtol=0, atol=1e-12)
    np.testing.assert_allclose(run.grassmann_final, dist, rtol=0, atol=1e-12)


def test_phi_is_mean_cos2_of_scipy_principal_angles(peft_run):
    run = peft_run.run
    ckpt = {s: _checkpoint(p) for s, p in peft_run.ckpts.items()}
    checked = 0
    for m, name in enumerate(run.names):
        svds = {}
        for step, (factors, cfg) in ckpt.items():
            A, B = factors[name]
            svds[step] = _dense(A, B, _peft_scale(name, cfg)[1])
        r = run.modules[m]["rank"]
        final = svds[run.factor_steps[-1]]
        for t, step in enumerate(run.factor_steps.tolist()):  # φ to the final update
            S = svds[step][2]
            for i in range(1, r + 1):
                if not (_well_separated(S, i) and _well_separated(final[2], i)):
                    continue
                V, Vf = svds[step][3][:i].T, final[3][:i].T  # (d_in, i)
                assert run.phi_final[t, m, i - 1] == pytest.approx(_phi(V, Vf), abs=1e-9)
                checked += 1
            if _well_separated(S, r) and _well_separated(final[2], r):
                V, Vf = svds[step][3][:r].T, final[3][:r].T
                assert run.grassmann_final[t, m] == pytest.approx(_grassmann(V, Vf), abs=1e-7)
        steps = run.steps.tolist()
        assert np.all(np.isnan(run.metrics["phi_prev"][0, m]))  # nothing before the first
        for t in range(1, len(steps)):  # φ to the previous snapshot
            S, Sp = svds[steps[t]][2], svds[steps[t - 1]][2]
            for i in range(1, r + 1):
                if not (_well_separated(S, i) and _well_separated(Sp, i)):
                    continue
                V, Vp = svds[steps[t]][3][:i].T, svds[steps[t - 1]][3][:i].T
                got = run.metrics["phi_prev"][t, m, i - 1]
                assert got == pytest.approx(_phi(V, Vp), abs=1e-9), (name, steps[t], i)
                checked += 1
    assert checked > 100


# ------------------------------------------------------- 3. rank use, norms, amplification


def test_scalar_metrics_equal_dense_recomputations(peft_run):
    run = peft_run.run
    steps = run.steps.tolist()
    met = run.metrics
    ks = 0
    for m, meta in enumerate(run.modules):
        name = meta["name"]
        W = peft_run.base[name]  # (d_out, d_in), copied before training
        live_W = peft_run.layers[name].get_base_layer().weight.detach().double().numpy()
        assert np.array_equal(W, live_W)  # frozen
        assert meta["w_norm"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
        prev = None
        for t, step in enumerate(steps):
            factors, cfg = _checkpoint(peft_run.ckpts[step])
            A, B = factors[name]
            r, s = _peft_scale(name, cfg)
            D, U, S, Vh = _dense(A, B, s)
            S = S[:r]
            what = f"{name} step {step}"
            assert met["fro"][t, m] == pytest.approx(np.linalg.norm(D), rel=1e-12), what
            p = S / S.sum()
            assert met["effective_rank"][t, m] == pytest.approx(
                math.exp(-(p * np.log(p)).sum()), rel=1e-10
            )
            assert met["stable_rank"][t, m] == pytest.approx(
                np.linalg.norm(D) ** 2 / S[0] ** 2, rel=1e-10
            )
            for e, key in ((0.5, "k50"), (0.9, "k90"), (0.99, "k99")):
                want = _energy_k(S, e)
                if want is not None:
                    assert met[key][t, m] == want, (what, key)
                    ks += 1
            # amplification (Hu et al. 2021 §7.3): ‖ΔW‖_F / ‖Uᵀ W V‖_F over the top r
            proj = np.linalg.norm(U[:, :r].T @ W @ Vh[:r].T)
            assert met["projection"][t, m] == pytest.approx(proj, rel=1e-10), what
            assert met["amplification"][t, m] == pytest.approx(np.linalg.norm(D) / proj, rel=1e-10)
            if prev is None:
                assert math.isnan(met["grassmann_prev"][t, m]) and math.isnan(met["change"][t, m])
            else:
                Dp, Vhp = prev
                change = np.linalg.norm(D - Dp) / np.linalg.norm(D)
                assert met["change"][t, m] == pytest.approx(change, rel=1e-9), what
                if _well_separated(S, r):
                    assert met["grassmann_prev"][t, m] == pytest.approx(
                        _grassmann(Vh[:r].T, Vhp[:r].T), abs=1e-7
                    )
            prev = (D, Vh)
    assert ks > 50
    # the same numbers through dynamics(): None where not measured, values otherwise
    for d, meta in zip(dynamics(run), run.modules, strict=True):
        m = run.names.index(d.module)
        assert d.steps == steps and d.rank == meta["rank"]
        assert d.fro == met["fro"][:, m].tolist()
        assert d.k90 == met["k90"][:, m].tolist()
        assert d.change[0] is None and d.change[1:] == met["change"][1:, m].tolist()
        assert d.amplification == met["amplification"][:, m].tolist()
        assert d.singular_values[-1] == met["sigma"][-1, m, : d.rank].tolist()
        k90_final = int(met["k90"][-1, m])
        assert d.k90_final == k90_final
        if k90_final < d.nominal_rank:  # advice: the rank, and the alpha that keeps the scale
            assert d.suggested_rank == k90_final
            assert d.suggested_alpha == pytest.approx(d.scale * math.sqrt(k90_final))
            stays = [t for t in range(len(steps)) if all(met["k90"][t:, m] <= k90_final)]
            assert d.k90_since == steps[stays[0]]
        else:
            assert d.suggested_rank is None


# ------------------------------------------------------------------------------------ 4. DoRA


def test_dora_trainer_tracks_the_direction_part(dora_run):
    run = dora_run.run
    assert run.steps.tolist() == [2, 4, 6] == list(dora_run.ckpts)
    assert {m["family"] for m in run.modules} == {"dora"}
    assert {m["update"] for m in run.modules} == {"dora-direction"}
    assert {d.family for d in dora_run.result} == {"dora"}
    for step, path in dora_run.ckpts.items():
        factors, cfg = _checkpoint(path)
        assert cfg["use_dora"] is True
        with pytest.warns(LoraScopeWarning, match="dora-direction"):
            adapter = load_adapter(path)
        t = _index(run, step)
        for m, meta in enumerate(run.modules):
            name = meta["name"]
            A, B = factors[name]
            r, s = _peft_scale(name, cfg)
            assert meta["rank"] == r and meta["scale"] == pytest.approx(s, rel=1e-15)
            assert meta["scale"] == dora_run.layers[name].scaling["default"]
            assert adapter[name].family == "dora" and adapter[name].is_dora
            _, _, S, _ = _dense(A, B, s)  # s·B A: DoRA's direction part, no magnitude
            _assert_sigma(run.metrics["sigma"][t, m], S, r, f"DoRA step {step} {name}")
    assert sorted({m["rank"] for m in run.modules}) == [3, 4]


# ------------------------------------------------------------------------ 5. lorascope.train


def test_lorascope_train_tracking_matches_checkpoints_and_does_not_perturb(tmp_path):
    pytest.importorskip("tokenizers")
    from test_train_loop import _config, _write_tiny_task

    from lorascope.train import train

    task = _write_tiny_task(tmp_path)
    tracked, plain = tmp_path / "tracked", tmp_path / "plain"
    # LoRA dropout draws from torch's global generator every step: a tracker that used it
    # (or touched a parameter or gradient) would change the trained adapter
    metrics = train(_config(task, tracked, checkpoint_every=2, track_every=1, dropout=0.1))
    train(_config(task, plain, checkpoint_every=2, dropout=0.1))
    assert (tracked / "tracking.h5").is_file() and not (plain / "tracking.h5").exists()
    assert metrics["tracking_seconds"] > 0
    for name in ("adapter_model.safetensors", "head.safetensors"):  # bit-identical training
        a, b = load_file(tracked / name), load_file(plain / name)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    run = read_run(tracked / "tracking.h5")
    assert run.steps.tolist() == run.factor_steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert run.config["track_every"] == 1 and run.phi_final is not None
    saved = {2: tracked / "checkpoints" / "step-000002", 4: tracked / "checkpoints" / "step-000004"}
    saved[6] = tracked  # the final adapter
    for step, path in saved.items():
        factors, cfg = _checkpoint(path)
        assert sorted(factors) == sorted(run.names)
        t = _index(run, step)
        for m, name in enumerate(run.names):
            A, B = factors[name]
            r, s = _peft_scale(name, cfg)
            assert run.modules[m]["scale"] == s
            _, _, S, _ = _dense(A, B, s)
            _assert_sigma(run.metrics["sigma"][t, m], S, r, f"step {step} {name}")
            fA, fB = run.factors(m, _factor_index(run, step))
            assert np.array_equal(fA, A) and np.array_equal(fB, B)


# ------------------------------------------------------------- 6. killed runs, cut-off files


def _check_prefix(path: Path, seed: int):
    """A killed run's file: a consistent prefix whose factors reproduce its σ."""
    run = read_run(path)
    n = len(run)
    assert run.config == {"seed": seed}
    assert run.steps.tolist() == list(range(1, n + 1))  # every=1, nothing torn or repeated
    for key, v in run.metrics.items():
        assert v.shape[0] == n, key
    assert run.seconds.shape == run.loss.shape == (n,)
    np.testing.assert_allclose(run.loss, 1.0 / run.steps)
    assert run.factor_steps.tolist() == run.steps.tolist()  # factors at every snapshot
    assert run.phi_final is None and run.grassmann_final is None  # no end: no settle/done
    if n == 0:
        with pytest.raises(LoraScopeError, match="no snapshot"):
            dynamics(run)
        return run
    for t in sorted({0, n // 2, n - 1}):
        for m, meta in enumerate(run.modules):
            A, B = run.factors(m, t)
            _, _, S, _ = _dense(A, B, meta["scale"])
            _assert_sigma(run.metrics["sigma"][t, m], S, meta["rank"], f"{path} t={t}")
    res = dynamics(run)  # computes the settling curve from the stored factors itself
    for m, d in enumerate(res):
        assert len(d.phi_to_final) == n and d.phi_to_final[-1] == pytest.approx(1.0)
        A0, B0 = run.factors(m, 0)
        A1, B1 = run.factors(m, n - 1)
        r = d.rank
        V0 = _dense(A0, B0, d.scale)[3][:r].T
        V1 = _dense(A1, B1, d.scale)[3][:r].T
        assert d.phi_to_final[0] == pytest.approx(_phi(V0, V1), abs=1e-9)
    return run


@pytest.mark.slow
def test_killed_runs_leave_readable_prefixes(tmp_path):
    """Ten tracked runs (forked from one process, so torch is imported once) are killed with
    SIGKILL: six at random times mid-run, one right after creating its file, three inside a
    dataset append (one during the first snapshot). Each file reads back as a consistent
    prefix, and one is also read while its run is still writing it."""
    rng = random.Random(2024)
    modes = ["loop"] * 6 + ["create", f"append:{rng.randint(1, 21)}"]  # 22 appends a snapshot
    modes += [f"append:{rng.randint(22, 400)}" for _ in range(2)]
    delays = {i: rng.uniform(0.0, 0.8) for i, mode in enumerate(modes) if mode == "loop"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    helper = subprocess.Popen(
        [sys.executable, str(HERE / "tracking_writer.py"), str(tmp_path), *modes],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in helper.stdout], daemon=True).start()
    pids: dict[int, int] = {}
    exits: dict[int, int] = {}
    ready: dict[int, float] = {}

    def take(timeout: float) -> None:
        word, i, *rest = lines.get(timeout=timeout).split()
        if word == "child":
            pids[int(i)] = int(rest[0])
        elif word == "ready":
            ready[int(i)] = time.monotonic()
        else:
            exits[int(i)] = int(rest[0])

    try:
        deadline = time.monotonic() + 60
        while not set(delays) <= set(ready):
            assert helper.poll() is None, helper.stderr.read()
            take(max(0.1, deadline - time.monotonic()))
        first = min(delays)  # read while its run is still writing it
        assert len(_check_prefix(tmp_path / f"run{first}.h5", first)) >= 1
        for i in sorted(delays, key=lambda i: ready[i] + delays[i]):
            time.sleep(max(0.0, ready[i] + delays[i] - time.monotonic()))
            os.kill(pids[i], signal.SIGKILL)
        helper.wait(timeout=60)
        while len(exits) < len(modes):
            take(5)
    finally:
        if helper.poll() is None:
            for pid in pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            helper.kill()
            helper.wait()
    err = helper.stderr.read()
    assert helper.returncode == 0, err
    lengths = {}
    for i, mode in enumerate(modes):
        assert exits[i] == signal.SIGKILL, (mode, err)
        path = tmp_path / f"run{i}.h5"
        assert path.is_file(), mode  # the file exists as soon as its layout is complete
        lengths[i] = len(_check_prefix(path, i))
    assert not list(tmp_path.glob(".*.tmp"))
    assert lengths[6] == 0 and lengths[7] == 0  # no snapshot: killed at creation, in the first
    assert all(lengths[i] >= 1 for i in (*delays, 8, 9))


def test_a_torn_last_snapshot_is_left_out(tmp_path):
    """Datasets that differ in length by the snapshot being written when the run died: the
    reader keeps the snapshots every dataset holds."""
    tracker, _ = _small_run(tmp_path / "run.h5", steps=4)
    tracker.close()
    full = read_run(tmp_path / "run.h5")
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f["steps"].resize(3, axis=0)  # the 4th snapshot's metrics and factors, not its step
        f["metrics/sigma"].resize(5, axis=0)  # and a row past every other dataset
    run = read_run(tmp_path / "run.h5")
    assert len(run) == 3 and run.steps.tolist() == [1, 2, 3]
    assert all(v.shape[0] == 3 for v in run.metrics.values())
    np.testing.assert_array_equal(run.metrics["sigma"], full.metrics["sigma"][:3])
    assert run.factor_steps.tolist() == [1, 2, 3]
    assert run.phi_final is None  # the stored curve is of 4 snapshots: recomputed for 3
    d = dynamics(run)
    assert all(len(x.phi_to_final) == 3 and x.phi_to_final[-1] == pytest.approx(1.0) for x in d)


def _small_run(path: Path, steps: int = 6, **tracker_options) -> tuple[Tracker, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    inject(net, ["0", "2"], r=3, alpha=6)
    tracker = Tracker(path, every=1, **tracker_options)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for _, m in net.named_modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.add_(0.1 * torch.randn_like(m.lora_B))
        tracker.step(net, step)
    return tracker, net


def test_truncated_file_is_a_one_line_format_error(tmp_path, one_line_error):
    tracker, _ = _small_run(tmp_path / "full.h5")
    tracker.close()
    data = (tmp_path / "full.h5").read_bytes()
    assert len(read_run(tmp_path / "full.h5")) == 6
    rng = random.Random(7)
    cuts = [0, 1, 7, 8, 100, 511, 2048, len(data) // 2, len(data) - 1]
    cuts += [rng.randrange(1, len(data)) for _ in range(6)]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.h5"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError) as e:
            read_run(path)
        one_line_error(e, path)


# ---------------------------------------------------------------------------------- 7. errors


def test_tracker_refuses_an_existing_path_and_bad_options(tmp_path, one_line_error):
    path = tmp_path / "exists.h5"
    path.write_text("keep me")
    with pytest.raises(LoraScopeError) as e:
        Tracker(path, every=1)
    one_line_error(e, path)
    assert path.read_text() == "keep me"
    tracker, _ = _small_run(path, steps=2, overwrite=True)
    tracker.close()
    assert len(read_run(path)) == 2
    for kw in ({"every": 0}, {"every": 2, "factors_every": 3}, {"every": 2, "amplify_every": 5}):
        with pytest.raises(LoraScopeError):
            Tracker(tmp_path / "x.h5", **kw)
    with pytest.raises(LoraScopeError, match="closed"):
        tracker.step(nn.Linear(2, 2), 10)


def test_live_modules_without_lora_raises():
    with pytest.raises(LoraScopeError, match="no LoRA layer"):
        live_modules(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_nan_factors_mid_run_are_recorded_as_not_measured(tmp_path, caplog):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    inject(net, ["0", "2"], r=3, alpha=6)
    first, second = net[0], net[2]
    path = tmp_path / "nan.h5"
    tracker = Tracker(path, every=1)
    # NaN at the first snapshot: nothing can size the file yet, so the tracker waits
    first.lora_B.data.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="lorascope.tracking"):
        assert tracker.step(net, 1) is False
    assert not path.exists()
    assert any("step 1: 0 not measured" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        first.lora_B.copy_(torch.randn_like(first.lora_B))
    x = torch.randn(16, 12)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorascope.tracking"):
        for step in range(2, 9):
            with torch.no_grad():
                if step == 5:  # a NaN step in the second module, then the training recovers
                    saved = second.lora_B.detach().clone()
                    second.lora_B.fill_(float("nan"))
                if step == 6:
                    second.lora_B.copy_(saved)
            opt.zero_grad()
            net(x).square().mean().backward()
            if step != 5:
                opt.step()
            assert tracker.step(net, step) is True
    result = tracker.close()
    assert [r.getMessage() for r in caplog.records if "not measured" in r.getMessage()] == [
        next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 5: 2 "))
    ]
    run = read_run(path)
    assert run.steps.tolist() == list(range(2, 9))
    t5, t6 = _index(run, 5), _index(run, 6)
    assert np.all(np.isnan(run.metrics["sigma"][t5, 1])) and math.isnan(run.metrics["fro"][t5, 1])
    assert run.metrics["k90"][t5, 1] == -1
    assert np.isfinite(run.metrics["sigma"][t5, 0, :3]).all()  # the other module is measured
    assert np.isfinite(run.metrics["sigma"][t6, 1, :3]).all()  # and this one again after
    assert np.all(np.isnan(run.metrics["phi_prev"][t6, 1]))  # no comparison across the gap
    assert math.isnan(run.metrics["change"][t6, 1])
    d = result[1]
    assert d.fro[t5] is None and d.k90[t5] is None and d.phi_to_final[t5] is None
    assert d.phi_to_final[-1] == pytest.approx(1.0)
    # the stored σ after the gap are still the dense SVD of the module's factors
    A, B = run.factors(1, _factor_index(run, 8))
    _assert_sigma(run.metrics["sigma"][-1, 1], _dense(A, B, 2.0)[2], 3, "after NaN")


def test_read_run_refuses_other_files(tmp_path, one_line_error):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    results = ROOT / "figures" / "results.h5"  # a lorascope report's results.h5
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    cases = [other, text, tmp_path / "missing.h5"]
    if results.is_file():
        cases.append(results)
    for path in cases:
        with pytest.raises(FormatError) as e:
            read_run(path)
        one_line_error(e, path)
    # a tracking file of a newer version
    tracker, _ = _small_run(tmp_path / "v.h5", steps=1)
    tracker.close()
    with h5py.File(tmp_path / "v.h5", "r+") as f:
        f.attrs["version"] = 99
    with pytest.raises(FormatError, match="version 99"):
        read_run(tmp_path / "v.h5")


# ----------------------------------------------------------------------------- 8. TensorBoard


class _Recorder:
    """A stand-in for ``SummaryWriter``: records ``add_scalar`` calls."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, {})[step] = value

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _expected_scalars(run) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for m, meta in enumerate(run.modules):
        r = meta["rank"]
        for t, step in enumerate(run.steps.tolist()):
            for key, v in (
                ("sigma1", run.metrics["sigma"][t, m, 0]),
                ("k90", run.metrics["k90"][t, m]),
                ("fro", run.metrics["fro"][t, m]),
                ("effective_rank", run.metrics["effective_rank"][t, m]),
                ("phi_prev", run.metrics["phi_prev"][t, m, r - 1]),
                ("amplification", run.metrics["amplification"][t, m]),
            ):
                if math.isfinite(v) and v >= 0:
                    out.setdefault(f"lorascope/{meta['name']}/{key}", {})[step] = float(v)
    return out


def test_tensorboard_scalars_through_a_summary_writer_object(tmp_path):
    rec = _Recorder()
    tracker, _ = _small_run(tmp_path / "tb.h5", steps=5, tensorboard=rec, amplify_every=2)
    tracker.close()
    assert rec.closed
    run = read_run(tmp_path / "tb.h5")
    want = _expected_scalars(run)
    assert rec.scalars == want
    assert set(want["lorascope/0/amplification"]) == {2, 4}  # amplify_every=2
    assert set(want["lorascope/0/phi_prev"]) == {2, 3, 4, 5}  # none at the first snapshot


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    tb = tmp_path / "tb"
    tracker, _ = _small_run(tmp_path / "run.h5", steps=4, tensorboard=tb)
    tracker.close()
    assert list(tb.glob("events.out.tfevents.*"))
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tb))
    acc.Reload()
    want = _expected_scalars(read_run(tmp_path / "run.h5"))
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, values in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == values.keys()
        for step, v in values.items():
            assert got[step] == pytest.approx(v, rel=1e-6)


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(LoraScopeError) as e:
        Tracker(tmp_path / "run.h5", every=1, tensorboard=tmp_path / "tb")
    assert "\n" not in str(e.value) and "tensorboard" in str(e.value).lower()
    assert not (tmp_path / "run.h5").exists()


# ---------------------------------------------------------------------- 9. custom loops


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(24, 16)
        self.qkv = nn.Linear(24, 48)  # fused q, k, v of 16 each
        self.out = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.q(x), self.qkv(x)], -1).tanh())


def _merged_delta(layer: MergedLoRALinear) -> np.ndarray:
    """Dense ΔW of a fused layer, part by part: rows of part p get s·B_p A_p."""
    A = layer.lora_A.detach().double().numpy()  # (k·r, d_in), parts stacked
    B = layer.lora_B.detach().double().numpy()  # (k·d, r)
    r, d = layer.r, layer.part_size
    D = np.zeros((layer.out_features, layer.in_features))
    parts = [p for p, e in enumerate(layer.enable_lora) if e]
    for j, p in enumerate(parts):
        D[p * d : (p + 1) * d] = layer.scale * B[j * d : (j + 1) * d] @ A[j * r : (j + 1) * r]
    return D


def test_custom_loop_with_lorascope_layers(tmp_path):
    torch.manual_seed(0)
    net = _Block()
    W = {n: getattr(net, n).weight.detach().double().numpy().copy() for n in ("q", "qkv")}
    inject(net, ["q", "qkv"], r=3, alpha=6, rank_pattern={"q": 5}, fused={"qkv": (1, 0, 1)})
    assert isinstance(net.q, LoRALinear) and isinstance(net.qkv, MergedLoRALinear)
    head = net.out
    head.weight.requires_grad_(False)
    head.bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(32, 24), torch.randint(0, 5, (32,))
    tracker = Tracker(tmp_path / "run.h5", every=2, factors_every=4)
    dense: dict[int, dict[str, np.ndarray]] = {}
    for step in range(1, 11):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        wrote = tracker.step(net, step)
        assert wrote == (step % 2 == 0)
        if wrote:
            Dq = net.q.scale * (net.q.lora_B.detach().double() @ net.q.lora_A.detach().double())
            dense[step] = {"q": Dq.numpy(), "qkv": _merged_delta(net.qkv)}
    assert tracker.step(net, 10) is False and tracker.step(net, 8, force=True) is False
    assert np.allclose(dense[10]["qkv"], net.qkv.delta_weight().detach().double().numpy())
    tracker.close()
    run = read_run(tmp_path / "run.h5")
    assert run.names == ["q", "qkv"] and run.steps.tolist() == [2, 4, 6, 8, 10]
    assert [m["rank"] for m in run.modules] == [5, 6]  # the fused layer: 2 parts × r = 3
    assert [m["scale"] for m in run.modules] == [6 / 5, 2.0]
    for t, step in enumerate(run.steps.tolist()):
        for m, name in enumerate(run.names):
            k = run.modules[m]["rank"]
            U, S, Vh = np.linalg.svd(dense[step][name], full_matrices=False)
            _assert_sigma(run.metrics["sigma"][t, m], S, k, f"{name} step {step}")
            proj = np.linalg.norm(U[:, :k].T @ W[name] @ Vh[:k].T)
            assert run.metrics["projection"][t, m] == pytest.approx(proj, rel=1e-9)
    # the names and scales are those of the adapter lorascope saves from the same model
    from lorascope.train import save_adapter

    saved = load_adapter(save_adapter(net, tmp_path / "adapter", "none"))
    assert sorted(m.key for m in saved) == run.names
    for m, meta in enumerate(run.modules):
        assert saved[meta["name"]].scale == pytest.approx(meta["scale"], rel=1e-15)
        A, B = run.factors(m, _factor_index(run, 8))
        np.testing.assert_allclose(
            _dense(A, B, meta["scale"])[0], dense[8][meta["name"]], rtol=0, atol=1e-6
        )


def test_custom_loop_with_loralib_layers(tmp_path):
    lora = pytest.importorskip("loralib")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = lora.Embedding(20, 12, r=4, lora_alpha=8)
            self.fc = lora.Linear(12, 10, r=3, lora_alpha=3)
            self.shared = lora.Embedding(12, 12, r=2, lora_alpha=4)  # square: orientation counts

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.wte(ids) + self.shared(ids % 12))

    torch.manual_seed(0)
    net = Net()
    lora.mark_only_lora_as_trainable(net)
    net.train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.05)
    ids, y = torch.randint(0, 20, (16, 5)), torch.randn(16, 5, 10)
    tracker = Tracker(tmp_path / "run.h5", every=1)
    dense = []
    for step in range(1, 5):
        opt.zero_grad()
        (net(ids) - y).square().mean().backward()
        opt.step()
        tracker.step(net, step)
        row = {}
        for name in ("wte", "fc", "shared"):
            layer = getattr(net, name)
            D = (
                layer.scaling
                * (layer.lora_B.detach().double() @ layer.lora_A.detach().double()).numpy()
            )
            if isinstance(layer, nn.Embedding):
                D = D.T  # loralib merges (B A)ᵀ into the (num_embeddings, dim) table
            row[name] = (D, layer.weight.detach().double().numpy())
        dense.append(row)
    tracker.close()
    run = read_run(tmp_path / "run.h5")
    assert run.names == ["wte", "fc", "shared"]
    # ΔW in the weight's own orientation, as lorascope reads a saved loralib file
    torch.save(lora.lora_state_dict(net), tmp_path / "lora.pt")
    saved = load_adapter(tmp_path / "lora.pt", alpha=8)
    for meta in run.modules:
        D, _ = dense[-1][meta["name"]]
        assert (meta["d_out"], meta["d_in"]) == D.shape == saved[meta["name"]].shape
    for t in range(4):
        for m, meta in enumerate(run.modules):
            D, W = dense[t][meta["name"]]
            k = meta["rank"]
            U, S, Vh = np.linalg.svd(D, full_matrices=False)
            _assert_sigma(run.metrics["sigma"][t, m], S, k, f"{meta['name']} step {t + 1}")
            proj = np.linalg.norm(U[:, :k].T @ W @ Vh[:k].T)
            assert run.metrics["projection"][t, m] == pytest.approx(proj, rel=1e-9), meta
    merged = lora.MergedLinear(12, 24, r=2, enable_lora=[True, False, True])
    with pytest.raises(LoraScopeError, match="MergedLinear"):
        Tracker(tmp_path / "merged.h5", every=1).step(nn.Sequential(merged), 1)


def test_peft_conv1d_amplification_uses_the_transposed_weight(tmp_path, tiny_gpt2):
    """GPT-2 ``Conv1D`` stores W as (d_in, d_out): the tracker must use Wᵀ."""
    peft = pytest.importorskip("peft")
    W = tiny_gpt2.transformer.h[0].attn.c_attn.weight.detach().double().numpy().T.copy()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    pm = peft.get_peft_model(tiny_gpt2, cfg)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    tracker = Tracker(tmp_path / "run.h5", every=1)
    tracker.step(pm, 1)
    tracker.close()
    run = read_run(tmp_path / "run.h5")
    m = run.names.index("transformer.h.0.attn.c_attn")
    A = layer.lora_A["default"].weight.detach().numpy()
    B = layer.lora_B["default"].weight.detach().numpy()
    D, U, S, Vh = _dense(A, B, layer.scaling["default"])
    assert D.shape == W.shape == (96, 32)
    _assert_sigma(run.metrics["sigma"][0, m], S, 4, "c_attn")
    proj = np.linalg.norm(U[:, :4].T @ W @ Vh[:4].T)
    assert run.metrics["projection"][0, m] == pytest.approx(proj, rel=1e-9)
