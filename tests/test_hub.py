"""Hub names, offline (issue 14): ``org/name[/sub][@rev]`` from a local Hugging Face cache.

The cache is laid out as ``huggingface_hub`` lays it out (``models--org--name/{blobs, refs,
snapshots/<sha>}`` with the snapshot files linked into ``blobs``), in a temporary ``HF_HOME``;
``huggingface_hub.scan_cache_dir`` must recognise it before anything else is checked. Every
test runs with sockets refused, so a lookup that tried the network would fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_gpt2
from huggingface_hub import scan_cache_dir
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from lorascope.cli.main import main
from lorascope.errors import FormatError
from lorascope.formats import load_adapter, load_base
from lorascope.hub import hub_cache_dir, parse_hub_name, resolve_path

C1 = hashlib.sha1(b"first commit").hexdigest()
C2 = hashlib.sha1(b"second commit").hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under ``HF_HOME=tmp/hf``; no socket may connect."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def refuse(*args, **kwargs):
        raise AssertionError("a Hub name was looked up over the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path / "hf" / "hub"


def put(cache: Path, repo_id: str, src: Path, commit: str, refs=("main",), under="") -> Path:
    """Cache the files of ``src`` as ``repo_id`` at ``commit`` (in folder ``under``), the way
    ``hf download`` does: content in ``blobs/<sha256>``, the snapshot file a relative link to
    it, each of ``refs`` a file holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / under / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


def peft_adapter(where: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (r = 4 on GPT-2 ``c_attn``) with seeded non-zero factors."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(build_tiny_gpt2(), cfg).save_pretrained(where)
    return where


def factors(path) -> dict[str, torch.Tensor]:
    return {f"{m.name}.{x}": getattr(m, x) for m in load_adapter(path) for x in ("A", "B")}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture
def two_versions(tmp_path, cache):
    """``org/lora``: commit C1 (tag ``v1``) and commit C2 (``main``), different weights."""
    v1, v2 = peft_adapter(tmp_path / "v1", 1), peft_adapter(tmp_path / "v2", 2)
    put(cache, "org/lora", v1, C1, refs=("v1",))
    put(cache, "org/lora", v2, C2, refs=("main",))
    return v1, v2


def test_the_layout_is_one_huggingface_hub_recognises(two_versions, cache):
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/lora" and repo.repo_type == "model"
    refs = {r.commit_hash: set(r.refs) for r in repo.revisions}
    assert refs == {C1: {"v1"}, C2: {"main"}}
    files = {r.commit_hash: {f.file_name for f in r.files} for r in repo.revisions}
    assert files[C1] == {p.name for p in two_versions[0].iterdir()} >= {"adapter_config.json"}


def test_main_branch_tag_and_commit(two_versions, cache):
    v1, v2 = two_versions
    assert_same(factors("org/lora"), factors(v2))
    assert_same(factors("org/lora@main"), factors(v2))
    assert_same(factors("org/lora@v1"), factors(v1))
    assert_same(factors(f"org/lora@{C1}"), factors(v1))
    assert resolve_path(f"org/lora@{C2}") == cache / "models--org--lora" / "snapshots" / C2
    assert not torch.equal(*(factors(v)["transformer.h.0.attn.c_attn.A"] for v in (v1, v2)))


def test_cli_reads_a_hub_name_like_the_folder(two_versions):
    _, v2 = two_versions
    by_name = CliRunner().invoke(main, ["spectrum", "org/lora", "--json"])
    by_path = CliRunner().invoke(main, ["spectrum", str(v2), "--json"])
    assert by_name.exit_code == 0, by_name.output
    assert json.loads(by_name.stdout) == json.loads(by_path.stdout)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("org/missing", "hf download org/missing"),
        ("org/lora@v9", "hf download org/lora --revision v9"),
        (f"org/lora@{'0' * 40}", f"hf download org/lora --revision {'0' * 40}"),
    ],
)
def test_not_cached_is_one_line_naming_the_cache(two_versions, tmp_path, name, hint):
    with pytest.raises(FormatError) as e:
        load_adapter(name)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: ")
    assert f"HF_HOME={tmp_path / 'hf'}" in msg and msg.endswith(hint)
    r = CliRunner().invoke(main, ["spectrum", name])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.output
    assert hint in r.stderr


def test_a_local_folder_shadows_the_hub_name(two_versions, tmp_path, monkeypatch):
    v1, v2 = two_versions
    monkeypatch.chdir(tmp_path)
    assert_same(factors("org/lora"), factors(v2))  # no local org/lora yet: the cache
    shutil.copytree(v1, tmp_path / "org" / "lora")
    assert resolve_path("org/lora") == Path("org/lora")
    assert_same(factors("org/lora"), factors(v1))


def test_subfolder_and_a_file_inside_the_snapshot(tmp_path, cache):
    a, b = peft_adapter(tmp_path / "a", 3), peft_adapter(tmp_path / "b", 4)
    put(cache, "org/many", a, C1, under="task_a")
    put(cache, "org/many", b, C1, under="task_b")
    assert_same(factors("org/many/task_b"), factors(b))
    assert_same(factors(f"org/many/task_a@{C1}"), factors(a))
    assert_same(factors("org/many/task_a/adapter_model.safetensors"), factors(a))
    with pytest.raises(FormatError, match=r"^org/many/task_c: .* has no task_c: hf download"):
        load_adapter("org/many/task_c")


def test_sharded_base_and_merge_from_hub_names(tmp_path, cache):
    model = build_tiny_gpt2()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    adapter = peft_adapter(tmp_path / "adapter", 5)
    snap = put(cache, "org/gpt2", tmp_path / "base", C1)
    put(cache, "org/gpt2-lora", adapter, C2)
    assert len(list(snap.glob("model-*.safetensors"))) > 1
    base = load_base("org/gpt2")
    assert base.path == "org/gpt2" and base.entry == snap / "model.safetensors.index.json"
    assert {f.parent for f in base.files()} == {snap}
    state = model.state_dict()
    key = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(base.tensor(key), state[key], rtol=0, atol=0)
    assert base.bytes_read == state[key].numel() * state[key].element_size()

    out = tmp_path / "merged"
    r = CliRunner().invoke(
        main, ["merge", "--base", "org/gpt2", "--delta", "org/gpt2-lora", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    ref = tmp_path / "merged_ref"
    r = CliRunner().invoke(
        main, ["merge", "--base", tmp_path / "base", "--delta", adapter, "--out", str(ref)]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
    for f in ref.glob("*.safetensors"):
        assert_same(load_file(out / f.name), load_file(f))
    # the library too: a Hub-named base's config files come along
    from lorascope.merge import merge_adapter

    lib = tmp_path / "merged_lib"
    merge_adapter("org/gpt2", "org/gpt2-lora", lib)
    assert sorted(p.name for p in lib.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_cache_folder_follows_the_environment_at_call_time(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir()[0] == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir()[0] == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfh"))
    assert hub_cache_dir() == (tmp_path / "hfh" / "hub", f"HF_HOME={tmp_path / 'hfh'}")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir()[0] == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hub_cache_dir() == (tmp_path / "hc", f"HF_HUB_CACHE={tmp_path / 'hc'}")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("org/name", ("org/name", None, "")),
        ("org/name@v1.0", ("org/name", "v1.0", "")),
        ("org/name/a/b@refs/pr/3", ("org/name", "refs/pr/3", "a/b")),
        ("Org-1/na.me_2", ("Org-1/na.me_2", None, "")),
        ("gpt2", None),  # no organization: never looked up
        ("/abs/org/name", None),
        ("./org/name", None),
        ("~/org/name", None),
        ("org/-name", None),
        ("org/name.", None),
        ("org/name@", None),
        ("org/name/../x", None),
        ("org/name@../x", None),
        ("org//name", None),
        ("org/na me", None),
    ],
)
def test_parse_hub_name(text, parsed):
    got = parse_hub_name(text)
    assert (got if got is None else (got.repo_id, got.revision, got.subfolder)) == parsed


def test_without_huggingface_hub_a_hub_name_says_what_to_install(cache, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FormatError, match=r"^org/x: .*pip install 'lorascope\[hub\]'$"):
        load_adapter("org/x")
    assert resolve_path(tmp_path) == tmp_path  # local paths never need it


def test_doctests():
    import doctest

    import lorascope.hub

    res = doctest.testmod(lorascope.hub)
    assert res.attempted > 0 and res.failed == 0
