"""``lorascope scan`` and the collection database (lorascope.collection.scan / db).

Adapters are written by the real peft (tiny GPT-2 and Llama built from configs) and by
lorascope's kohya and HDF5 writers; every stored number is checked against a dense numpy SVD of
``s·B @ A`` built from the factors the writer was given (peft's own ``lora_A``/``lora_B`` and
``scaling``), never from lorascope's reader.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from conftest import build_tiny_gpt2, build_tiny_llama

from lorascope.adapter import LoraModule
from lorascope.cli.main import main
from lorascope.collection import Collection, discover, scan
from lorascope.collection.db import ADAPTER_COLUMNS, MODULE_COLUMNS
from lorascope.errors import LoraScopeError
from lorascope.formats import save_h5, write_kohya

ROOT = Path(__file__).resolve().parents[1]
# the module, not the function `lorascope.collection.scan` that the package exports
scan_mod = importlib.import_module("lorascope.collection.scan")

# ----------------------------------------------------------------------------- the collection


def _gpt2():  # the function's name is the adapters' base_model_name_or_path ("tiny/gpt2")
    return build_tiny_gpt2()


def _llama():
    return build_tiny_llama()


def _peft(model_fn, out: Path, *, seed: int, init: bool = False, **lora) -> dict:
    """Save a peft LoRA adapter of ``model_fn()`` to ``out``; return ``{key: (A, B, s)}`` as
    peft holds them (float64 numpy), ``key`` the module name without ``base_model.model.``."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for GPT-2's Conv1D
        model = get_peft_model(model_fn(), LoraConfig(init_lora_weights=init, **lora))
    model.save_pretrained(out)
    # the base a hub adapter names (set after saving: peft would look it up online)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = f"tiny/{model_fn.__name__[1:]}"
    (out / "adapter_config.json").write_text(json.dumps(config))
    ref = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            A = mod.lora_A["default"].weight.detach().double().numpy()  # (r, d_in)
            B = mod.lora_B["default"].weight.detach().double().numpy()  # (d_out, r)
            ref[name.removeprefix("base_model.model.")] = (A, B, float(mod.scaling["default"]))
    return ref


def _synthetic(seed: int, shapes: list[tuple[int, int, int]], scale: float):
    g = torch.Generator().manual_seed(seed)
    mods, ref = [], {}
    for i, (d_out, d_in, r) in enumerate(shapes):
        # a decaying spectrum, so the top directions are well separated
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64) * 0.5 ** torch.arange(r)[:, None]
        B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        key = f"lora_unet_down_blocks_{i}_attn_to_q"
        mods.append(LoraModule(key, A.float(), B.float(), scale, alpha=scale * r))
        ref[key] = (A.float().double().numpy(), B.float().double().numpy(), scale)
    return mods, ref


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A folder of good adapters: ``(root, {resolved path: {key: (A, B, s)}})``."""
    root = tmp_path_factory.mktemp("zoo")
    refs: dict[str, dict] = {}
    gpt = dict(target_modules=["c_attn", "c_proj", "c_fc"])
    refs["gpt_r2"] = _peft(_gpt2, root / "gpt_r2", seed=1, r=2, lora_alpha=8, **gpt)
    refs["gpt_r4"] = _peft(
        _gpt2, root / "gpt_r4", seed=2, r=4, lora_alpha=4, use_rslora=True, **gpt
    )
    llama = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    refs["llama"] = _peft(
        _llama, root / "llama", seed=3, r=4, lora_alpha=16, rank_pattern={"o_proj": 2}, **llama
    )
    refs["llama/checkpoints/step-10"] = _peft(
        _llama, root / "llama" / "checkpoints" / "step-10", seed=4, r=4, lora_alpha=8, **llama
    )
    (root / "llama" / "optimizer.pt").write_bytes(b"not part of the adapter")
    mods, refs["loose/kohya.safetensors"] = _synthetic(5, [(24, 16, 3), (16, 24, 3)], 0.5)
    (root / "loose").mkdir()
    write_kohya(mods, root / "loose" / "kohya.safetensors")
    mods, refs["loose/own.h5"] = _synthetic(6, [(20, 12, 4)], 2.0)
    save_h5(mods, root / "loose" / "own.h5")
    (root / ".hidden").mkdir()
    shutil.copytree(root / "gpt_r2", root / ".hidden" / "copy")  # hidden folders are skipped
    (root / "loose" / "notes.txt").write_text("not an adapter suffix")
    return root, {str((root / k).resolve()): v for k, v in refs.items()}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, zoo) -> tuple[Path, dict[str, str]]:
    """A folder of bad adapters: ``(root, {resolved path: the file its error must name})``."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad")
    zoo_root, _ = zoo
    out = {}
    # a truncated safetensors file
    data = (zoo_root / "loose" / "kohya.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated.safetensors"] = "truncated.safetensors"
    # NaN weights in a PEFT directory
    shutil.copytree(zoo_root / "llama", root / "nan", ignore=shutil.ignore_patterns("checkp*"))
    from safetensors.torch import load_file

    t = load_file(root / "nan" / "adapter_model.safetensors")
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key][0, 0] = float("nan")
    save_file(t, root / "nan" / "adapter_model.safetensors", metadata={"format": "pt"})
    out["nan"] = "nan/adapter_model.safetensors"
    # all-zero B: real peft's default initialization, saved untrained
    _peft(_llama, root / "zero", seed=7, init=True, r=2, target_modules=["q_proj"])
    out["zero"] = "zero/adapter_model.safetensors"
    # a pickle that asks to run code
    marker = root / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "evil.pt").write_bytes(pickle.dumps({"x.lora_A": Evil()}))
    out["evil.pt"] = "evil.pt"
    # junk
    (root / "junk.bin").write_bytes(np.random.default_rng(0).bytes(1000))
    out["junk.bin"] = "junk.bin"
    (root / "text.safetensors").write_text("hello, I am not a tensor file\n")
    out["text.safetensors"] = "text.safetensors"
    return root, {str((root / k).resolve()): str(root / v) for k, v in out.items()}


def _dense(A: np.ndarray, B: np.ndarray, s: float):
    return np.linalg.svd(s * (B @ A), full_matrices=False)  # (d_out, k), (k,), (k, d_in)


def _energy_rank(S: np.ndarray, share: float) -> int:
    e = np.cumsum(S**2) / np.sum(S**2)
    return int(np.argmax(e >= share)) + 1


def dump(db: Path, *, ids: bool = True) -> tuple[list, list, dict]:
    """Everything the database holds but ``scanned_at`` and ``stat``, in a fixed order."""
    conn = sqlite3.connect(db)
    cols = [c for c in ADAPTER_COLUMNS if c != "scanned_at" and (ids or c != "id")]
    adapters = conn.execute(f"SELECT {', '.join(cols)} FROM adapters ORDER BY path").fetchall()
    mcols = [f'm."{c}"' for c in MODULE_COLUMNS if ids or c != "adapter_id"]
    modules = conn.execute(
        f"SELECT a.path, {', '.join(mcols)} FROM modules m JOIN adapters a "
        "ON a.id = m.adapter_id ORDER BY a.path, m.rowid"
    ).fetchall()
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    return adapters, modules, meta


def _count_calls(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(scan_mod, name)

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_mod, name, counted)
    return calls


# ----------------------------------------------------------------------------- discovery


def test_discover_directories_files_globs_and_lists(zoo, tmp_path):
    root, refs = zoo
    found = discover([root])
    assert found == sorted(refs)  # adapter dirs, checkpoints, loose files; no hidden copy
    assert str(root / "llama" / "optimizer.pt") not in found
    # files, globs, a list file with a comment and a relative line; duplicates collapse
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# adapters\n{root / 'gpt_r2'}\n\n{os.path.relpath(root / 'llama', tmp_path)}\n"
    )
    got = discover([root / "loose" / "own.h5", str(root / "gpt_*"), f"@{listing}", root / "gpt_r2"])
    want = [root / "gpt_r2", root / "gpt_r4", root / "llama", root / "llama/checkpoints/step-10"]
    assert got == sorted([str(root / "loose" / "own.h5"), *map(str, want)])
    with pytest.raises(LoraScopeError, match="no such file"):
        discover([tmp_path / "missing"])
    with pytest.raises(LoraScopeError, match="matches nothing"):
        discover([str(tmp_path / "*.gguf")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraScopeError, match="no adapters found"):
        discover([tmp_path / "empty"])


# ----------------------------------------------------------------------------- the numbers


@pytest.fixture(scope="module")
def serial_db(zoo, bad, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("db") / "serial.db"
    summary = scan([zoo[0], bad[0]], db, workers=1, top_k=3)
    assert (summary.adapters, summary.scanned, summary.skipped_unchanged) == (12, 12, 0)
    assert summary.errors == len(bad[1]) == 6
    return db


@pytest.fixture(scope="module")
def both_db(zoo, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("db") / "both.db"
    scan([zoo[0]], db, workers=1, top_k=3, directions="both")
    return db


@pytest.mark.parametrize("which", ["right", "both"])
def test_stored_numbers_equal_dense_svd(zoo, serial_db, both_db, which):
    _, refs = zoo
    with Collection(serial_db if which == "right" else both_db) as c:
        assert c.meta["top_k"] == 3 and c.meta["schema_version"] == 1
        assert c.meta["directions"] == which
        adapters = {a["path"]: a for a in c.adapters(status="ok")}
        assert sorted(adapters) == sorted(refs)
        checked = 0
        for path, ref in refs.items():
            a = adapters[path]
            mods = {m["module"]: m for m in c.modules(adapter=path)}
            assert sorted(mods) == sorted(ref) and a["n_modules"] == len(ref)
            assert a["ranks"] == sorted({r[0].shape[0] for r in ref.values()})
            for key, (A, B, s) in ref.items():
                m = mods[key]
                U, S, Vh = _dense(A, B, s)
                k = min(A.shape[0], *B.shape)
                S = S[:k]
                assert (m["d_out"], m["d_in"], m["rank"]) == (B.shape[0], A.shape[1], A.shape[0])
                assert m["scale"] == pytest.approx(s, rel=1e-12)
                np.testing.assert_allclose(m["sigma"], S, rtol=0, atol=1e-10 * S[0])
                assert m["fro"] == pytest.approx(np.linalg.norm(s * (B @ A)), rel=1e-10)
                assert m["spectral"] == pytest.approx(S[0], rel=1e-10)
                p = S / S.sum()
                assert m["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), 1e-10)
                assert m["stable_rank"] == pytest.approx((S**2).sum() / S[0] ** 2, rel=1e-10)
                assert m["numerical_rank"] == np.linalg.matrix_rank(s * (B @ A))
                for col, share in (("k50", 0.5), ("k90", 0.9), ("k99", 0.99)):
                    assert m[col] == _energy_rank(S, share), (path, key, col)
                kd = min(3, k)
                assert m["k_dirs"] == kd
                assert m["V"].shape == (A.shape[1], kd) and m["V"].dtype == np.float32
                pairs = [(m["V"], Vh[:kd].T)]
                if which == "right":
                    assert m["U"] is None
                else:
                    assert m["U"].shape == (B.shape[0], kd) and m["U"].dtype == np.float32
                    pairs.append((m["U"], U[:, :kd]))
                for got, want in pairs:
                    np.testing.assert_allclose(got.T @ got, np.eye(kd), atol=1e-6)
                    theta = scipy.linalg.subspace_angles(got.astype(np.float64), want)
                    assert np.cos(theta).min() ** 2 == pytest.approx(1.0, abs=1e-6)
                checked += 1
        assert checked == sum(len(r) for r in refs.values()) == 35


def test_the_directions_setting_is_fixed_per_database(zoo, both_db, tmp_path):
    db = tmp_path / "c.db"
    shutil.copy(both_db, db)
    with pytest.raises(LoraScopeError, match="directions=both, not right"):
        scan([zoo[0]], db, workers=1, top_k=3, directions="right")
    assert scan([zoo[0]], db, workers=1, top_k=3).skipped_unchanged == 6  # default: the db's
    # a database from before the setting (no meta row) holds both: the default keeps both
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM meta WHERE key = 'directions'")
    conn.commit()
    conn.close()
    scan([zoo[0]], db, workers=1, top_k=3, verify=True)
    with Collection(db) as c:
        assert c.meta["directions"] == "both"


def test_adapter_rows(zoo, serial_db):
    root = zoo[0]
    with Collection(serial_db) as c:
        rows = {a["path"]: a for a in c.adapters()}
    gpt = rows[str(root / "gpt_r2")]
    assert (gpt["format"], gpt["families"], gpt["base"], gpt["status"]) == (
        "peft",
        ["lora"],
        "tiny/gpt2",
        "ok",
    )
    assert gpt["error"] is None and gpt["lorascope_version"]
    kohya = rows[str(root / "loose" / "kohya.safetensors")]
    assert (kohya["format"], kohya["base"]) == ("kohya", None)
    # the content hash, computed independently: name, NUL, 8-byte size, bytes
    f = root / "loose" / "own.h5"
    data = f.read_bytes()
    want = hashlib.sha256(b"own.h5\0" + len(data).to_bytes(8, "little") + data).hexdigest()
    assert rows[str(f)]["hash"] == want and rows[str(f)]["bytes"] == len(data)
    # a directory: its config and weights file, in name order (not optimizer.pt)
    h, total = hashlib.sha256(), 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (root / "llama" / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        total += len(data)
    assert rows[str(root / "llama")]["hash"] == h.hexdigest()
    assert rows[str(root / "llama")]["bytes"] == total
    # the file: 64 KiB pages, WAL journal
    conn = sqlite3.connect(serial_db)
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 65536
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_bad_files_are_recorded_and_the_scan_goes_on(bad, serial_db):
    root, names = bad
    with Collection(serial_db) as c:
        errors = {a["path"]: a for a in c.adapters(status="error")}
        assert sorted(errors) == sorted(names)
        for path, a in errors.items():
            assert "\n" not in a["error"] and names[path] in a["error"], a["error"]
            assert a["families"] is None and a["n_modules"] is None
            assert c.modules(adapter=path) == []
        assert "exactly zero" in errors[str(root / "zero")]["error"]
        assert (
            "NaN" in errors[str(root / "nan")]["error"]
            or "nan" in errors[str(root / "nan")]["error"]
        )
    assert not (root / "pwned").exists()  # the pickle's payload never ran


# ----------------------------------------------------------------------------- engines


@pytest.mark.slow
def test_two_local_workers_and_dask_equal_serial(zoo, bad, serial_db, tmp_path):
    two = tmp_path / "two.db"
    s2 = scan([zoo[0], bad[0]], two, workers=2, top_k=3)
    assert s2.engine == "2 processes" and (s2.scanned, s2.errors) == (12, 6)
    assert dump(two) == dump(serial_db)

    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        # the CLI, with the scheduler from the environment
        d = tmp_path / "dask.db"
        args = ["scan", str(zoo[0]), str(bad[0]), "--db", str(d), "--top-k", "3", "--json"]
        env = {scan_mod.ENV_SCHEDULER: cluster.scheduler_address}
        res = CliRunner().invoke(main, args, env=env)
        assert res.exit_code == 0, res.output
        sd = json.loads(res.stdout)
        assert sd["engine"] == f"dask {cluster.scheduler_address}"
        assert (sd["scanned"], sd["errors"]) == (12, 6)
        # the library, with a client of one's own
        with distributed.Client(cluster) as client:
            c = tmp_path / "client.db"
            assert scan([zoo[0], bad[0]], c, scheduler=client, top_k=3).scanned == 12
            assert client.status == "running"  # not closed by the scan
    assert dump(d) == dump(serial_db)
    assert dump(c) == dump(serial_db)


# ----------------------------------------------------------------------------- interruptions


def test_interrupted_scan_resumes_to_the_same_database(zoo, bad, serial_db, tmp_path, monkeypatch):
    db = tmp_path / "resumed.db"
    real, calls = scan_mod.scan_one, []

    def dies_on_the_fifth(path, *args):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(scan_mod, "scan_one", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        scan([zoo[0], bad[0]], db, workers=1, top_k=3)
    monkeypatch.setattr(scan_mod, "scan_one", real)
    adapters, _, _ = dump(db)
    assert [a[1] for a in adapters] == calls[:4]  # the four finished ones, nothing else

    loads = _count_calls(monkeypatch, "load_adapter")
    summary = scan([zoo[0], bad[0]], db, workers=1, top_k=3)
    assert (summary.scanned, summary.skipped_unchanged, summary.errors) == (8, 4, 6)
    assert sorted(loads) == sorted(set(discover([zoo[0], bad[0]])) - set(calls[:4]))
    assert dump(db) == dump(serial_db)


def test_sigkill_inside_a_transaction_leaves_no_half_adapter(zoo, bad, serial_db, tmp_path):
    db = tmp_path / "killed.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        import lorascope.collection.db as db
        real, n = db._insert_modules, []
        def insert_then_die(conn, modules):
            real(conn, modules)
            n.append(1)
            if len(n) == 3:  # the third adapter's rows are in, not committed
                os.kill(os.getpid(), signal.SIGKILL)
        db._insert_modules = insert_then_die
        from lorascope.cli.main import main
        main(["scan", {str(zoo[0])!r}, {str(bad[0])!r}, "--db", {str(db)!r}, "--workers", "1",
              "--top-k", "3"])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT id, n_modules, status FROM adapters ORDER BY id").fetchall()
    assert len(rows) == 2  # the third was rolled back whole
    for adapter_id, n, status in rows:
        stored = conn.execute("SELECT COUNT(*) FROM modules WHERE adapter_id = ?", (adapter_id,))
        assert stored.fetchone()[0] == (n if status == "ok" else 0)
    assert conn.execute("SELECT COUNT(*) FROM modules WHERE adapter_id > 2").fetchone()[0] == 0
    conn.close()

    out = CliRunner().invoke(
        main,
        [
            "scan",
            str(zoo[0]),
            str(bad[0]),
            "--db",
            str(db),
            "--workers",
            "1",
            "--top-k",
            "3",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert (summary["scanned"], summary["skipped_unchanged"], summary["errors"]) == (10, 2, 6)
    assert dump(db) == dump(serial_db)


# ----------------------------------------------------------------------------- incremental


def _backdate(root: Path, seconds: float = 3600) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_rescan_reads_only_what_changed(zoo, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    shutil.copytree(zoo[0], root)
    db = tmp_path / "c.db"
    first = scan([root], db, workers=1)
    assert (first.adapters, first.scanned) == (6, 6)
    before = dump(db)

    loads = _count_calls(monkeypatch, "load_adapter")
    again = scan([root], db, workers=1)  # fresh files: their hashes are compared
    assert loads == [] and (again.scanned, again.skipped_unchanged) == (0, 6)
    assert dump(db) == before

    # a changed file is read again and only its rows change
    kohya = root / "loose" / "kohya.safetensors"
    mods, ref = _synthetic(99, [(24, 16, 3), (16, 24, 3)], 0.25)
    write_kohya(mods, kohya)
    changed = scan([root], db, workers=1)
    assert loads == [str(kohya)] and (changed.scanned, changed.skipped_unchanged) == (1, 5)
    after = dump(db)
    keep = [a for a in before[0] if a[1] != str(kohya)]
    assert [a for a in after[0] if a[1] != str(kohya)] == keep
    assert [m for m in after[1] if m[0] != str(kohya)] == [
        m for m in before[1] if m[0] != str(kohya)
    ]
    with Collection(db) as c:
        for m in c.modules(adapter=str(kohya)):
            _, S, _ = _dense(*ref[m["module"]])
            np.testing.assert_allclose(m["sigma"], S[:3], rtol=0, atol=1e-10 * S[0])


def test_prune_deletes_only_adapters_whose_paths_are_gone(zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(zoo[0], root)
    db = tmp_path / "c.db"
    scan([root], db, workers=1)
    shutil.rmtree(root / "gpt_r2")
    kept = scan([root], db, workers=1)  # by default a vanished adapter stays
    assert kept.removed == 0 and ", 0 removed" not in kept.line()
    with Collection(db) as c:
        assert str(root / "gpt_r2") in {a["path"] for a in c.adapters()}
        n_modules = len(c.modules(directions=False))
        gone = len(c.modules(adapter=str(root / "gpt_r2"), directions=False))
    pruned = scan([root / "llama"], db, workers=1, prune=True)  # prunes outside its paths too
    assert pruned.removed == 1 and "1 removed" in pruned.line()
    with Collection(db) as c:
        paths = {a["path"] for a in c.adapters()}
        assert str(root / "gpt_r2") not in paths and len(paths) == 5
        assert len(c.modules(directions=False)) == n_modules - gone > 0


def test_unchanged_times_skip_hashing(zoo, tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    shutil.copytree(zoo[0], root)
    db = tmp_path / "c.db"
    _backdate(root)
    scan([root], db, workers=1)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM adapters WHERE stat IS NULL").fetchone()[0] == 0
    conn.close()
    hashes = _count_calls(monkeypatch, "content_hash")
    loads = _count_calls(monkeypatch, "load_adapter")
    skipped = scan([root], db, workers=1)
    assert (hashes, loads, skipped.skipped_unchanged) == ([], [], 6)
    verified = scan([root], db, workers=1, verify=True)
    assert len(hashes) == 6 and loads == [] and verified.skipped_unchanged == 6

    # new content of the same size with the old modification time: the change time and
    # inode still differ, so it is hashed and read
    own = root / "loose" / "own.h5"
    st = own.stat()
    mods, ref = _synthetic(77, [(20, 12, 4)], 2.0)
    save_h5(mods, own)
    os.utime(own, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashes.clear()
    changed = scan([root], db, workers=1)
    assert hashes == [str(own)] and loads == [str(own)] and changed.scanned == 1
    with Collection(db) as c:
        (m,) = c.modules(adapter=str(own))
        _, S, _ = _dense(*ref[m["module"]])
        np.testing.assert_allclose(m["sigma"], S[:4], rtol=0, atol=1e-10 * S[0])


def test_errors_are_retried_only_when_changed_or_asked(bad, tmp_path, monkeypatch):
    root = tmp_path / "bad"
    shutil.copytree(bad[0], root)
    db = tmp_path / "b.db"
    assert scan([root], db, workers=1).errors == 6
    loads = _count_calls(monkeypatch, "load_adapter")
    again = scan([root], db, workers=1)
    assert loads == [] and (again.errors, again.skipped_unchanged, again.new_errors) == (6, 6, [])
    retried = scan([root], db, workers=1, retry_errors=True)
    assert len(loads) == 6 and (retried.scanned, retried.errors) == (6, 6)
    # a fixed file is read again and becomes ok
    loads.clear()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ROOT / "sample_adapters" / "lora_r8" / name, root / "nan")
    fixed = scan([root], db, workers=1)
    assert loads == [str(root / "nan")] and fixed.errors == 5
    with Collection(db) as c:
        assert [a["path"] for a in c.adapters(status="ok")] == [str(root / "nan")]


# ----------------------------------------------------------------------------- reading back


def _parse(text: str, column: str):
    if text == "":
        return None
    if column in ("families", "ranks", "sigma"):
        return json.loads(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_export_csv_round_trips(serial_db, tmp_path):
    with Collection(serial_db) as c:
        for table, want in (("adapters", c.adapters()), ("modules", c.modules(directions=False))):
            out = tmp_path / f"{table}.csv"
            assert c.export(table, out) == len(want) > 0
            with open(out, newline="") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == len(want)
            for row, rec in zip(rows, want, strict=True):
                assert list(row) == [k for k in rec]
                for col, text in row.items():
                    got, exp = _parse(text, col), rec[col]
                    if isinstance(exp, np.ndarray):
                        assert np.array_equal(np.array(got), exp)  # bit-exact floats
                    elif col in ("path", "hash", "module", "error", "base", "kind"):
                        assert text == ("" if exp is None else exp)
                    else:
                        assert got == exp, (col, text, exp)
        with pytest.raises(LoraScopeError, match=r"\.csv or \.parquet"):
            c.export("modules", tmp_path / "x.json")


def test_export_parquet(serial_db, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with Collection(serial_db) as c:
        want = c.modules(directions=False)
        assert c.export("modules", tmp_path / "m.parquet") == len(want)
        got = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [g["module"] for g in got] == [w["module"] for w in want]
    assert all(np.array_equal(g["sigma"], w["sigma"]) for g, w in zip(got, want, strict=True))


def test_collection_queries(zoo, serial_db):
    root = zoo[0]
    with Collection(serial_db) as c:
        q0 = c.modules(layer=0, kind="q")
        assert [m["path"] for m in q0] == [
            str(root / "llama"),
            str(root / "llama/checkpoints/step-10"),
            str(root / "loose/kohya.safetensors"),  # lora_unet_down_blocks_0_attn_to_q
        ]
        assert all(m["layer"] == 0 and m["kind"] == "q" for m in q0)
        llama = c.adapters(status="ok")[2]
        assert llama["path"] == str(root / "llama")
        by_id = c.modules(adapter=llama["id"], directions=False)
        assert [m["module"] for m in by_id] == [
            m["module"] for m in c.modules(adapter=llama["path"])
        ]
        assert "V" not in by_id[0] and by_id[0]["sigma"].dtype == np.float64
        assert [m["rank"] for m in by_id if m["kind"] == "o"] == [2, 2]  # rank_pattern
        with pytest.raises(LoraScopeError, match="no adapter"):
            c.modules(adapter="/nowhere")
        pd = pytest.importorskip("pandas")
        df = c.to_pandas("modules", kind="v")
        assert isinstance(df, pd.DataFrame) and len(df) == 4 and df["V"].iloc[0].shape == (32, 3)
        assert list(c.to_pandas("adapters").columns) == list(ADAPTER_COLUMNS)


# ----------------------------------------------------------------------------- the CLI


def test_cli_scan_counts_errors_and_exits_0(zoo, bad, tmp_path):
    db, out = tmp_path / "cli.db", tmp_path / "adapters.csv"
    args = ["scan", str(zoo[0]), str(bad[0]), "--db", str(db), "--workers", "1"]
    res = CliRunner().invoke(main, [*args, "--export", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("12 adapters: 12 scanned, 0 unchanged, 6 errors")
    assert f"12 adapters rows -> {out}" in res.stdout
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 6 and all(str(bad[0]) in line for line in warned)
    assert len(out.read_text().splitlines()) == 13
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0 and res.stderr == ""
    got = json.loads(res.stdout)
    assert (got["adapters"], got["scanned"], got["skipped_unchanged"], got["errors"]) == (
        12,
        0,
        12,
        6,
    )


def test_cli_bad_input_is_one_line_and_exit_2(zoo, serial_db, tmp_path):
    (tmp_path / "text.db").write_text("not a database at all " * 100)
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    (tmp_path / "empty").mkdir()
    copy = tmp_path / "copy.db"
    shutil.copy(serial_db, copy)
    adapter = str(zoo[0] / "gpt_r2")
    cases = [
        ([adapter, "--db", str(tmp_path / "no" / "dir" / "x.db")], "unable to open"),
        ([adapter, "--db", str(tmp_path / "text.db")], "not a database"),
        ([adapter, "--db", str(tmp_path / "other.db")], "not a lorascope collection"),
        ([adapter, "--db", str(tmp_path)], "is a directory"),
        ([str(tmp_path / "empty"), "--db", str(tmp_path / "e.db")], "no adapters found"),
        ([str(tmp_path / "nothing"), "--db", str(tmp_path / "e.db")], "no such file"),
        ([adapter, "--db", str(copy)], "scanned with top_k=3"),
        ([adapter, "--db", str(copy), "--workers", "1", "--scheduler", "x"], "exclusive"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(main, ["scan", *args])
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert (tmp_path / "text.db").read_text().startswith("not a database")


def test_missing_dask_is_a_one_line_error(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    adapter = zoo[0] / "gpt_r2"
    with pytest.raises(LoraScopeError, match=r"pip install 'lorascope\[collection\]'"):
        scan([adapter], tmp_path / "a.db", scheduler="tcp://127.0.0.1:1")
    monkeypatch.setenv(scan_mod.ENV_SCHEDULER, "tcp://127.0.0.1:1")
    with pytest.raises(LoraScopeError, match=r"dask\.distributed"):
        scan([adapter], tmp_path / "b.db")
    assert scan([adapter], tmp_path / "c.db", workers=1).scanned == 1  # explicit workers win
    with pytest.raises(TypeError, match="rcond"):
        scan([adapter], tmp_path / "d.db", workers=1, rcond=1e-3)


def test_a_concurrent_scan_of_the_same_database_is_refused(zoo, tmp_path, monkeypatch):
    db, root = tmp_path / "race.db", zoo[0]
    real, first = scan_mod.scan_one, []

    def another_scan_commits_first(path, *args):
        if not first:  # while this scan holds ids 1-2, another one writes id 1
            first.append(path)
            monkeypatch.setattr(scan_mod, "scan_one", real)
            assert scan([root / "loose" / "own.h5"], db, workers=1).scanned == 1
        return real(path, *args)

    monkeypatch.setattr(scan_mod, "scan_one", another_scan_commits_first)
    with pytest.raises(LoraScopeError, match="another scan of this database"):
        scan([root / "gpt_r2", root / "gpt_r4"], db, workers=1)
    with Collection(db) as c:
        assert [(a["id"], a["path"]) for a in c.adapters()] == [(1, str(root / "loose/own.h5"))]
        assert len(c.modules(adapter=1)) == 1
