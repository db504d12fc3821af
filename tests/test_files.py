"""What lorascope leaves on disk and on its pipes (issue 14): atomic output with the usual file
modes, and a reader that closes stdout early (``lorascope ... | head``) ends it quietly."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_gpt2
from peft import LoraConfig, get_peft_model

import lorascope._files as files
from lorascope._files import commit, save_safetensors, staging_dir, write_atomic
from lorascope.cli.main import main
from lorascope.errors import FormatError
from lorascope.formats import load_adapter, save_adapter
from lorascope.formats import write as write_mod
from lorascope.tracking.store import RunWriter

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_adapters"


def run(*args: object):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def modes(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``root`` and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.slow
def test_everything_the_cli_writes_has_the_umask_modes(tmp_path, umask):
    """Report, merge, resize (PEFT directory and .h5), rank --pattern-out, train (with
    tracking and checkpoints) and a tracking run: files 0o666 and folders 0o777 less the umask
    (0o644/0o755 under 022), as ``open()`` and ``mkdir()`` make them (``safetensors``'
    ``save_file`` alone makes 0o600 files); nothing hidden left beside them."""
    pytest.importorskip("tokenizers")
    from test_train_loop import _write_tiny_task

    out = tmp_path / "out"
    out.mkdir()
    train_f, test_f, base = _write_tiny_task(tmp_path)
    toml = tmp_path / "train.toml"
    toml.write_text(
        f'train_file = "{train_f}"\ntest_file = "{test_f}"\nbase = "{base}"\n'
        f'out_dir = "{out / "trained"}"\nmax_len = 12\nbatch_size = 8\nthreads = 1\n'
        "progress = false\nmax_steps = 4\ncheckpoint_every = 2\ntrack_every = 2\n"
    )
    run("train", toml)
    run("report", SAMPLES / "lora_r1", SAMPLES / "lora_r2", "--out", out / "report",
        "--no-progress", "--module", "q")  # fmt: skip
    model = build_tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    run("merge", "--base", tmp_path / "base", "--delta", tmp_path / "adapter",
        "--out", out / "merged")  # fmt: skip
    run("merge", "--base", tmp_path / "base", "--delta", tmp_path / "adapter",
        "--out", out / "merged.safetensors")  # fmt: skip
    run("resize", SAMPLES / "lora_r8", "--rank", 2, "--out", out / "resized")
    run("resize", SAMPLES / "lora_r8", "--rank", 2, "--out", out / "resized.h5")
    run("rank", SAMPLES / "lora_r8", "--pattern-out", out / "pattern.json")
    meta = {"name": "layers.0.q_proj", "layer": 0, "kind": "q", "d_out": 4, "d_in": 4, "rank": 2}
    RunWriter(out / "run.h5", [meta], [np.float32], {"every": 1}).close()

    got = modes(out)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for name in ("report", "merged", "resized", "trained", "trained/checkpoints"):
        assert any(k.startswith(f"{name}/") for k in got), name
    for name in ("report/index.md", "report/results.h5", "merged/config.json", "run.h5",
                 "merged.safetensors", "resized/adapter_config.json", "resized.h5",
                 "pattern.json", "trained/adapter_model.safetensors",
                 "trained/head.safetensors", "trained/tracking.h5"):  # fmt: skip
        assert name in got, name
    wrong = {
        k: oct(m) for k, m in got.items() if m != (want_dir if (out / k).is_dir() else want_file)
    }
    assert not wrong, f"umask {oct(umask)}: {wrong}"
    assert not [k for k in got if Path(k).name.startswith(".")]  # no staging siblings left


def test_save_safetensors_gives_the_umask_mode_save_file_does_not(tmp_path, umask):
    from safetensors.torch import load_file, save_file

    t = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(t, tmp_path / "raw.safetensors")
    save_safetensors(t, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600  # the bug
    assert stat.S_IMODE((tmp_path / "ours.safetensors").stat().st_mode) == 0o666 & ~umask
    assert torch.equal(load_file(tmp_path / "ours.safetensors")["w"], t["w"])
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "raw.safetensors"]


def test_write_atomic_replaces_or_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(TypeError):  # the data fail while being written
        write_atomic(target, 12345)
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["a.json"]

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", fail)  # the rename fails
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "newer\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["a.json"]


def test_commit_swaps_a_folder_and_puts_it_back_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "w.bin").write_bytes(b"old")
    with staging_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"new")
        commit(tmp, target)
    assert (target / "w.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["model"]

    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place
            raise OSError(18, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(files.os, "rename", second_fails)
    with pytest.raises(OSError, match="cross-device"):
        with staging_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"newer")
            commit(tmp, target)
    assert len(calls) == 3  # aside, in (failed), back
    assert (target / "w.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("name", ["resized.h5", "resized"])
def test_a_failed_save_leaves_the_old_adapter(tmp_path, monkeypatch, name):
    adapter = load_adapter(SAMPLES / "lora_r8")
    out = tmp_path / name
    save_adapter(adapter, out)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(path, fmt, expected):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(write_mod, "_verify", broken)
    with pytest.raises(FormatError, match=rf"^{out}: cannot write: .*Input/output error"):
        save_adapter(adapter, out, force=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


# ----------------------------------------------------------------------------- broken pipe


@pytest.mark.parametrize(
    "flag",
    [
        None,
        pytest.param("--json", marks=pytest.mark.slow),
        pytest.param("--csv", marks=pytest.mark.slow),
    ],
)
def test_a_reader_that_closes_the_pipe_ends_it_quietly(flag):
    """stdout's read end is closed before lorascope writes its first byte (it is still
    importing torch), so the write fails with EPIPE every time: no message, no traceback,
    status 141 = 128 + SIGPIPE (the table goes through rich, which exits by itself)."""
    cmd = [sys.executable, "-m", "lorascope", "spectrum", str(SAMPLES / "lora_r8")]
    proc = subprocess.Popen(
        cmd + ([flag] if flag else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


@pytest.mark.slow
def test_head_gets_its_line_and_stderr_stays_empty():
    """The shell pipeline of the issue, ``lorascope spectrum ... | head -1``."""
    res = subprocess.run(
        f"'{sys.executable}' -m lorascope spectrum '{SAMPLES / 'lora_r8'}' --csv | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.stdout == "module,layer,kind,rank,index,singular_value,energy\n"
    assert res.stderr == ""


def test_doctests():
    import doctest

    import lorascope.adapter

    for mod in (files, lorascope.adapter):  # write_atomic; alpha_from_scale
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__
