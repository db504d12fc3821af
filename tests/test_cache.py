"""The persistent spectral cache of base weights (issue 15): what an entry serves, persistence,
corrupt entries, the size cap, concurrent writers, content keys, and its users (amplify,
intruders, report, the CLI)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascope.adapter import LoraModule
from lorascope.analysis import amplify
from lorascope.analysis.intruders import intruders
from lorascope.cache import SpectralCache, default_cache_dir
from lorascope.cli import main
from lorascope.formats import load_adapter, load_base
from lorascope.linalg import top_singular


def _w(m=60, n=40, seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LORASCOPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lorascope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == __import__("pathlib").Path.home() / ".cache" / "lorascope"
    monkeypatch.setenv("LORASCOPE_CACHE_MAX_BYTES", "1e6")
    assert SpectralCache(tmp_path).max_bytes == 10**6


def test_a_top_k_entry_serves_fewer_directions_and_a_larger_k_recomputes(tmp_path):
    W = _w()
    cache = SpectralCache(tmp_path)
    with cache.active():
        ref = top_singular(W, 6, method="exact")
        assert (cache.misses, cache.hits, cache.writes) == (1, 0, 1)
        few = top_singular(W, 3, method="exact")  # served from the top-6 entry
        assert (cache.misses, cache.hits) == (1, 1)
        more = top_singular(W, 9, method="exact")  # more than stored: computed and stored
        assert (cache.misses, cache.hits, cache.writes) == (2, 1, 2)
    exact = torch.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(few.S.numpy(), exact.S[:3].numpy(), rtol=1e-13)
    np.testing.assert_allclose(few.U.numpy(), ref.U[:, :3].numpy())
    np.testing.assert_allclose(more.S.numpy(), exact.S[:9].numpy(), rtol=1e-13)
    # a new process (a new cache object) finds them on disk, not in memory
    later = SpectralCache(tmp_path)
    with later.active():
        again = top_singular(W, 9, method="exact")
    assert (later.misses, later.hits) == (0, 1)
    torch.testing.assert_close(again.V, more.V, rtol=0, atol=0)
    assert len(later.entries()) == 1  # the top-9 entry replaced the top-6 one (same key)


def test_what_an_iterative_entry_may_serve(tmp_path):
    W = _w(300, 200)
    cache = SpectralCache(tmp_path)
    with cache.active():
        top_singular(W, 5, method="iterative", tol=1e-10)
        top_singular(W, 5, method="iterative", tol=1e-8)  # looser: served
        assert (cache.misses, cache.hits) == (1, 1)
        top_singular(W, 5, method="iterative", tol=1e-12)  # stricter: recomputed
        top_singular(W, 5, method="iterative", angle_tol=1e-4)  # vectors asked: not served
        top_singular(W, 5, method="iterative", angle_tol=1e-3)  # looser than stored: served
        top_singular(W, 5, method="exact")  # exact is never served by an iterative entry
        assert (cache.misses, cache.hits) == (4, 2)
        top_singular(W, 4, method="iterative", angle_tol=1e-9)  # the exact entry serves all
        assert cache.hits == 3
    assert len(cache.entries()) == 2  # the latest iterative entry and the exact one


def test_disabled_cache_writes_nothing_but_shares_within_the_run(tmp_path):
    cache = SpectralCache(tmp_path, enabled=False)
    W = _w()
    with cache.active():
        top_singular(W, 4)
        top_singular(W, 2)
    assert (cache.misses, cache.hits) == (1, 1)
    assert not any(tmp_path.iterdir())


def test_a_corrupt_entry_is_recomputed_and_replaced(tmp_path, caplog):
    W = _w()
    with SpectralCache(tmp_path).active():
        ref = top_singular(W, 4)
    (entry,) = SpectralCache(tmp_path).entries()
    entry.write_bytes(entry.read_bytes()[:100])  # a half-written file (e.g. a killed writer)
    cache = SpectralCache(tmp_path)
    with cache.active():
        got = top_singular(W, 4)
    assert (cache.misses, cache.hits) == (1, 0)
    assert "unreadable entry" in caplog.text
    torch.testing.assert_close(got.S, ref.S, rtol=0, atol=0)
    with SpectralCache(tmp_path).active() as fresh:
        top_singular(W, 4)
    assert fresh.hits == 1  # rewritten whole


def test_size_cap_evicts_the_least_recently_used(tmp_path):
    cache = SpectralCache(tmp_path)
    Ws = [_w(seed=i) for i in range(3)]
    with cache.active():
        for W in Ws:
            top_singular(W, 5)
    files = cache.entries()
    assert len(files) == 3
    one = files[0].stat().st_size
    for i, p in enumerate(files):  # distinct, ordered access times
        os.utime(p, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    with SpectralCache(tmp_path).active():  # a hit makes the oldest the newest
        top_singular(Ws[0], 5)
    small = SpectralCache(tmp_path, max_bytes=int(2.5 * one))
    assert small.evict() == 1
    with SpectralCache(tmp_path).active() as check:
        top_singular(Ws[0], 5)  # kept: used last
        top_singular(Ws[2], 5)  # kept
        top_singular(Ws[1], 5)  # evicted: recomputed
    assert (check.hits, check.misses) == (2, 1)


def _writer(directory: str, seed: int, rounds: int) -> None:
    torch.set_num_threads(1)
    cache = SpectralCache(directory)
    for r in range(rounds):
        for s in (0, 1, 2):  # every process writes the same three keys, and one of its own
            cache.forget()
            with cache.active():
                top_singular(_w(seed=s), 3 + (r + seed) % 3)
        with cache.active():
            top_singular(_w(seed=100 + seed), 4)


def test_concurrent_writers_leave_only_whole_entries(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, 4)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = SpectralCache(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind
    assert len(cache.entries()) == 6
    for s in (0, 1, 2, 100, 101, 102):
        W = _w(seed=s)
        with cache.active():
            got = top_singular(W, 2)
        np.testing.assert_allclose(got.S.numpy(), torch.linalg.svdvals(W)[:2].numpy(), rtol=1e-12)
    assert cache.misses == 0


def test_keys_follow_content_and_source():
    cache = SpectralCache(enabled=False)
    W = _w()
    assert cache.key(W) == cache.key(W.clone())  # untagged: all bytes
    assert cache.key(W) != cache.key(W.float())
    other = W.clone()
    other[7, 3] += 1e-12
    assert cache.key(W) != cache.key(other)
    # tagged: the source plus a sample of rows; a change in a sampled row changes the key
    a, b = W.clone(), W.clone()
    cache.tag(a, "digest|q.weight|(60, 40)|False|None")
    cache.tag(b, "digest|q.weight|(60, 40)|False|None")
    assert cache.key(a) == cache.key(b)
    b[0, 0] += 1.0
    assert cache.key(a) != cache.key(b)
    c = W.clone()
    cache.tag(c, "other-digest|q.weight|(60, 40)|False|None")
    assert cache.key(a) != cache.key(c)
    # an edit of one row outside the row sample (same file layout) still changes the key
    from lorascope.cache.spectral import _spread

    row = next(i for i in range(W.shape[0]) if i not in _spread(W.shape[0]))
    d = W.clone()
    cache.tag(d, "digest|q.weight|(60, 40)|False|None")
    d[row] += 0.5
    assert cache.key(a) != cache.key(d)


def test_fingerprints_of_base_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"l.0.q.weight": torch.randn(8, 6, generator=g), "l.0.v.weight": torch.randn(8, 6)}
    save_file(w, tmp_path / "a.safetensors")
    save_file({k: v + 1 for k, v in w.items()}, tmp_path / "b.safetensors")
    save_file({**w, "extra": torch.zeros(2)}, tmp_path / "c.safetensors")
    torch.save(w, tmp_path / "d.pt")
    torch.save({k: v + 1 for k, v in w.items()}, tmp_path / "e.pt")
    q = LoraModule("l.0.q", torch.zeros(1, 6), torch.zeros(8, 1), 1.0)
    v = LoraModule("l.0.v", torch.zeros(1, 6), torch.zeros(8, 1), 1.0)
    names = ("a.safetensors", "b.safetensors", "c.safetensors", "d.pt", "e.pt")
    fp = {name: load_base(tmp_path / name).fingerprint(q) for name in names}
    assert fp["a.safetensors"] == load_base(tmp_path / "a.safetensors").fingerprint(q)
    assert fp["a.safetensors"] != load_base(tmp_path / "a.safetensors").fingerprint(v)
    # the same layout: the header cannot tell them apart (the cache's row sample does)
    assert fp["a.safetensors"] == fp["b.safetensors"]
    assert fp["a.safetensors"] != fp["c.safetensors"]
    assert fp["d.pt"] is not None and fp["d.pt"] != fp["e.pt"]  # zip CRCs see the content


def _checkpoint(tmp_path, d=40, seed=9):
    g = torch.Generator().manual_seed(seed)
    w = {
        f"model.layers.{i}.self_attn.{p}_proj.weight": torch.randn(d, d, generator=g)
        for i in range(2)
        for p in ("q", "v")
    }
    save_file(w, str(tmp_path / "base.safetensors"))
    return w


def _adapter(path, d, r, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for p in ("q", "v"):
            name = f"model.layers.{i}.self_attn.{p}_proj"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, d, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.05
    save_file(tensors, str(path))
    return path


def test_a_second_adapter_on_the_same_base_factors_nothing(tmp_path):
    _checkpoint(tmp_path)
    base = load_base(tmp_path / "base.safetensors")
    a1 = load_adapter(_adapter(tmp_path / "a1.safetensors", 40, 4, 0))
    a2 = load_adapter(_adapter(tmp_path / "a2.safetensors", 40, 4, 1))
    cache = SpectralCache(tmp_path / "cache")
    r1 = amplify(a1, base, cache=cache, method="iterative")
    assert (cache.misses, cache.hits) == (4, 0)
    r2 = amplify(a2, load_base(tmp_path / "base.safetensors"), cache=cache, method="iterative")
    assert (cache.misses, cache.hits) == (4, 4)
    for cached, fresh in zip(r1 + r2, amplify(a1, base) + amplify(a2, base), strict=True):
        assert cached.proj_weight == pytest.approx(fresh.proj_weight, rel=1e-10)
        assert cached.proj_delta == fresh.proj_delta
    # intruders: the full SVD of each W, once
    i1 = intruders(a1, base, cache=cache)
    misses = cache.misses
    i2 = intruders(a2, base, cache=cache)
    assert cache.misses == misses and cache.hits >= 8
    for cached, fresh in zip(i1 + i2, intruders(a1, base) + intruders(a2, base), strict=True):
        np.testing.assert_array_equal(cached.similarity, fresh.similarity)


def test_amplify_without_the_w_baseline_equals_the_rest(tmp_path):
    _checkpoint(tmp_path)
    base = load_base(tmp_path / "base.safetensors")
    a = load_adapter(_adapter(tmp_path / "a.safetensors", 40, 4, 0))
    full = amplify(a, base)
    bare = amplify(a, base, w_baseline=False)
    for f, b in zip(full, bare, strict=True):
        assert b.proj_weight is None and b.proj_weight_bound is None
        assert (b.proj_delta, b.proj_random, b.norm_weight) == (
            f.proj_delta,
            f.proj_random,
            f.norm_weight,
        )
    assert b.to_dict()["proj_weight"] is None


def test_report_decomposes_each_weight_once_for_all_adapters(tmp_path):
    from lorascope.report import ReportOptions, compute_report, group_adapters

    w = _checkpoint(tmp_path)
    paths = [_adapter(tmp_path / f"a{i}.safetensors", 40, r, i) for i, r in enumerate((2, 4, 4))]
    members = group_adapters([load_adapter(p) for p in paths], [0, 0, 1])
    calls = []
    import lorascope.linalg as linalg

    real = linalg.top_singular_krylov

    def counting(W, k, **kw):
        calls.append((tuple(W.shape), k))
        return real(W, k, **kw)

    linalg.top_singular_krylov = counting
    try:
        opts = ReportOptions(method="iterative", weight_top=8, progress=False, kinds=("q", "v"))
        data = compute_report(members, tmp_path / "base.safetensors", opts)
    finally:
        linalg.top_singular_krylov = real
    assert len(calls) == len(w)  # one factorization per W, for three adapters
    for label, rows in data.projections.items():
        for row in rows:
            W = w[f"{row.module}.weight"]
            exact = torch.linalg.svdvals(W.double())[: row.k].norm()
            assert row.proj_weight == pytest.approx(float(exact), rel=1e-9), label


def test_adapters_of_one_run_share_the_norm_and_random_baseline_of_w(tmp_path):
    """Within ``cache.active()`` (a report), ‖W‖_F and the random baseline are computed once
    per (W, k, seed) and equal what each adapter gets alone; another k or seed recomputes."""
    import lorascope.analysis.projection as projection
    from lorascope.analysis import module_amplification

    _checkpoint(tmp_path)
    base = load_base(tmp_path / "base.safetensors")
    mods = [
        load_adapter(_adapter(tmp_path / f"a{i}.safetensors", 40, r, i)).modules[0]
        for i, r in enumerate((4, 4, 2))
    ]
    W = base.weight_for(mods[0])
    alone = [module_amplification(m, W, seed=s) for m in mods for s in (0, 1)]
    passes = []
    real = projection.weight_products

    def counting(W, V, **kw):
        passes.append((V.shape[1], kw.get("norm", True)))
        return real(W, V, **kw)

    cache = SpectralCache(enabled=False)
    projection.weight_products = counting
    try:
        with cache.active():
            shared = [module_amplification(m, W, seed=s) for m in mods for s in (0, 1)]
    finally:
        projection.weight_products = real
    for a, b in zip(alone, shared, strict=True):
        assert (b.norm_weight, b.proj_random) == (a.norm_weight, a.proj_random)
        # float32 GEMMs of 2k or k columns: the same to float32 rounding
        assert b.proj_delta == pytest.approx(a.proj_delta, rel=1e-6)
    assert alone[0].proj_random != alone[1].proj_random  # the seed matters
    # (r=4, seed 0), (4, 1), then the second r=4 adapter reuses both, then (2, 0), (2, 1)
    assert passes == [(8, True), (8, True), (4, False), (4, False), (4, True), (4, True)]


def test_cli_amplify_caches_and_no_cache_writes_nothing(tmp_path, monkeypatch):
    _checkpoint(tmp_path, d=40)
    _adapter(tmp_path / "a.safetensors", 40, 4, 0)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(cache_dir))
    args = ["amplify", "--base", str(tmp_path / "base.safetensors")]
    args += ["--delta", str(tmp_path / "a.safetensors"), "--alpha", "4", "--json"]
    runner = CliRunner()
    res = runner.invoke(main, [*args, "--no-cache"])
    assert res.exit_code == 0, res.output
    assert not cache_dir.exists()
    cold = runner.invoke(main, args)
    assert cold.exit_code == 0, cold.output
    assert len(SpectralCache(cache_dir).entries()) == 4
    warm = runner.invoke(main, args)
    assert json.loads(warm.output) == json.loads(cold.output) == json.loads(res.output)
    bare = runner.invoke(main, [*args, "--no-w-baseline"])
    assert bare.exit_code == 0, bare.output
    rows = json.loads(bare.output)
    assert all(r["proj_weight"] is None for r in rows)
    assert [r["proj_delta"] for r in rows] == [r["proj_delta"] for r in json.loads(cold.output)]


def test_cli_intruders_weight_similarity_and_report_use_the_cache(tmp_path, monkeypatch):
    _checkpoint(tmp_path, d=40)
    _adapter(tmp_path / "a.safetensors", 40, 4, 0)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(cache_dir))
    runner = CliRunner()
    base, delta = str(tmp_path / "base.safetensors"), str(tmp_path / "a.safetensors")
    common = ["--base", base, "--delta", delta, "--alpha", "4", "--layer", "0", "--json"]
    for cmd in (["intruders"], ["weight-similarity", "--max-i", "8"]):
        before = SpectralCache(cache_dir).entries()
        off = runner.invoke(main, [*cmd, *common, "--no-cache"])
        assert off.exit_code == 0, off.output
        assert SpectralCache(cache_dir).entries() == before  # nothing written
        on = runner.invoke(main, [*cmd, *common])
        assert on.exit_code == 0, on.output
        assert json.loads(on.output) == json.loads(off.output)
    # intruders stored the full SVD of each W; weight-similarity's top-8 came from them
    kinds = sorted(p.name.split(".")[1] for p in SpectralCache(cache_dir).entries())
    assert kinds == ["full", "full"]
    report_dir = tmp_path / "cache-report"
    monkeypatch.setenv("LORASCOPE_CACHE_DIR", str(report_dir))
    args = ["report", delta, "--base", base, "--alpha", "4", "--no-progress"]
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "rep"), "--no-cache"])
    assert res.exit_code == 0, res.output
    assert not report_dir.exists()
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 0, res.output
    assert len(SpectralCache(report_dir).entries()) == 4  # W's top-r of each module, kept
