"""Build the adapter zoo: many MiniLM LoRA adapters, one per Debian-metadata classification task.

Each task asks a different question of a package's English description (synopsis + long
description, as in ``scripts/build_debian_sections.py``, whose functions this script imports):
which debtags value of a facet it carries (``role::``, ``interface::``, ``implemented-in::``,
``use::``, ``works-with::``, ``game::``, ``field::``, ``uitoolkit::``, ``suite::``, ...),
which archive section of a group it is in, or whether it carries one tag or not. A package
enters a task only when exactly one of the task's labels applies to it. The split is by
*source* package (``in_test``), each label is capped at ``TRAIN_ROWS // k`` training and
``TEST_ROWS // k`` test rows by a seeded subsample (so the classes are balanced where the data
allow), and the same APT lists give the same files byte for byte.

Every task is then trained with the sample adapters' recipe (all-MiniLM-L6-v2, LoRA r = 8,
alpha = 8 on W_q and W_v of every layer, batch 32 at 48 tokens, lr 3e-3; see
``sample_adapters/configs/zoo.toml``, 120 steps); the whole zoo (30 tasks) takes about 40
minutes on two CPU cores: ``lorascope train
sample_adapters/configs/zoo.toml --set train_file=... --set test_file=... --set out_dir=...``
in ``--jobs`` single-threaded worker processes. Outputs:

- ``data/debian_zoo/<task>/{train,test}.jsonl.gz`` and ``data/debian_zoo/tasks.json`` (the task
  list: labels, row counts, description);
- ``sample_adapters/zoo/<task>/``: ``adapter_model.safetensors``, ``adapter_config.json`` (PEFT),
  ``head.safetensors`` (the classifier head, with the label names), ``train_config.json``,
  ``metrics.json``;
- the task table in ``sample_adapters/zoo/README.md`` (between ``<!-- zoo:start -->`` and
  ``<!-- zoo:end -->``).

Usage (from the repository root; the long descriptions need APT's English translations)::

    apt-get update -o Acquire::Languages=en
    nice -n 19 python scripts/build_zoo.py                 # data, then every missing adapter
    python scripts/build_zoo.py --data-only                 # only the task files
    python scripts/build_zoo.py --only use game --force     # retrain two tasks
    python scripts/build_zoo.py --table-only                # rewrite the README table

Adapters whose ``metrics.json`` exists are skipped unless ``--force`` (a killed build resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_debian_sections import (  # noqa: E402
    description_text,
    in_test,
    records,
    translations,
    write_jsonl_gz,
)

DATA = Path("data/debian_zoo")
OUT = Path("sample_adapters/zoo")
ZOO_TOML = Path("sample_adapters/configs/zoo.toml")
TRAIN_ROWS = 1500  # at most, over all labels
TEST_ROWS = 360
TEST_FRACTION = 0.2
MAX_CHARS = 240  # 48 WordPiece tokens are ~200 characters: keep the files small
SEED = 0


@dataclass(frozen=True)
class Task:
    """One classification task.

    ``kind`` is ``"tag"`` (labels are debtags; a package qualifies when it carries exactly one),
    ``"section"`` (labels are archive sections), or ``"binary"`` (``labels[0]`` is a tag: does
    the package carry it; the population is the packages carrying ``within``, or any tag).
    """

    name: str
    description: str
    kind: str
    labels: tuple[str, ...]
    within: str = ""


def _tags(facet: str, *values: str) -> tuple[str, ...]:
    return tuple(f"{facet}::{v}" for v in values)


# fmt: off
TASKS: list[Task] = [
    Task("role", "debtags role: what kind of package it is", "tag",
         _tags("role", "shared-lib", "program", "devel-lib", "documentation", "app-data",
               "plugin")),
    Task("interface", "debtags interface: how the user talks to it", "tag",
         _tags("interface", "commandline", "x11", "daemon", "text-mode", "web", "shell")),
    Task("implemented_in", "debtags implemented-in: its implementation language", "tag",
         _tags("implemented-in", "perl", "c", "c++", "python", "java", "lisp")),
    Task("use", "debtags use: what it is used for", "tag",
         _tags("use", "gameplaying", "converting", "editing", "checking", "viewing", "monitor")),
    Task("works_with", "debtags works-with: the kind of data it handles", "tag",
         _tags("works-with", "text", "audio", "image", "mail", "db", "software:source")),
    Task("scope", "debtags scope: a utility or a whole application", "tag",
         _tags("scope", "utility", "application")),
    Task("devel_lang", "debtags devel::lang: the language a development package is for", "tag",
         _tags("devel", "lang:perl", "lang:c", "lang:java", "lang:c++", "lang:haskell",
               "lang:python")),
    Task("game", "debtags game: the genre of a game", "tag",
         _tags("game", "arcade", "puzzle", "toys", "board", "strategy")),
    Task("field", "debtags field: the scientific or professional field", "tag",
         _tags("field", "mathematics", "biology", "finance", "statistics", "geography",
               "physics")),
    Task("uitoolkit", "debtags uitoolkit: the GUI toolkit it uses", "tag",
         _tags("uitoolkit", "gtk", "qt", "ncurses", "sdl", "xlib")),
    Task("network", "debtags network: its role on the network", "tag",
         _tags("network", "client", "server", "service", "scanner")),
    Task("admin", "debtags admin: the system-administration area", "tag",
         _tags("admin", "monitoring", "virtualization", "configuring", "filesystem", "hardware",
               "package-management")),
    Task("x11", "debtags x11: what kind of X11 component", "tag",
         _tags("x11", "application", "font", "applet", "library", "theme")),
    Task("suite", "debtags suite: the software suite it belongs to", "tag",
         _tags("suite", "gnu", "debian", "kde", "emacs", "gnome", "openstack")),
    Task("culture", "debtags culture: the language or country it is for", "tag",
         _tags("culture", "japanese", "german", "chinese", "french", "russian")),
    Task("made_of", "debtags made-of: what a data package consists of", "tag",
         _tags("made-of", "html", "font", "dictionary", "pdf")),
    Task("protocol", "debtags protocol: the network protocol it speaks", "tag",
         _tags("protocol", "http", "ssl", "ip", "ftp", "smtp", "dns")),
    Task("file_format", "debtags works-with-format: the file format it handles", "tag",
         _tags("works-with-format", "html", "tex", "xml", "mp3", "plaintext", "pdf")),
    Task("security", "debtags security: authentication or cryptography", "tag",
         _tags("security", "authentication", "cryptography")),
    Task("hardware", "debtags hardware: the hardware it deals with", "tag",
         _tags("hardware", "storage", "video", "input:keyboard", "emulation", "opengl",
               "hamradio")),
    Task("sec_media", "archive section among the media sections", "section",
         ("games", "graphics", "sound", "video")),
    Task("sec_langlib", "archive section among the scripting-language library sections",
         "section", ("python", "perl", "ruby", "javascript", "php")),
    Task("sec_compiled", "archive section among the compiled-language sections", "section",
         ("rust", "golang", "haskell", "ocaml", "java", "lisp")),
    Task("sec_system", "archive section among the system sections", "section",
         ("admin", "net", "kernel", "database", "utils")),
    Task("sec_science", "archive section among the science sections", "section",
         ("science", "math", "electronics", "hamradio", "gnu-r")),
    Task("sec_desktop", "archive section among the desktop sections", "section",
         ("gnome", "kde", "xfce", "x11")),
    Task("sec_libkind", "archive section: runtime library, development files or documentation",
         "section", ("libs", "libdevel", "doc")),
    Task("sec_text", "archive section among the text-handling sections", "section",
         ("text", "editors", "tex", "mail", "fonts")),
    Task("is_x11", "binary: does a program (role::program) have an X11 interface", "binary",
         ("interface::x11",), within="role::program"),
    Task("is_library", "binary: is a tagged package a library (devel::library)", "binary",
         ("devel::library",)),
]
# fmt: on


@dataclass(frozen=True)
class Package:
    name: str
    source: str
    section: str
    tags: frozenset[str]
    text: str


def packages(dump: str, translated: str) -> list[Package]:
    """One :class:`Package` per binary package with a description, as in
    ``build_debian_sections.build``: debug packages and repeated descriptions dropped."""
    long = {
        r["Description-md5"]: r["Description-en"]
        for r in records(translated)
        if "Description-md5" in r and "Description-en" in r
    }
    seen_pkg: set[str] = set()
    seen_text: set[str] = set()
    out = []
    for rec in records(dump):
        pkg = rec.get("Package", "")
        if not pkg or pkg in seen_pkg or "Description" not in rec:
            continue
        if pkg.endswith(("-dbg", "-dbgsym")):
            continue
        seen_pkg.add(pkg)
        text = description_text(long.get(rec.get("Description-md5", ""), rec["Description"]))
        if len(text) > MAX_CHARS:
            text = text[:MAX_CHARS].rsplit(" ", 1)[0]
        if text.lower() in seen_text or len(text) < 20:
            continue
        seen_text.add(text.lower())
        tags = frozenset(t.strip() for t in rec.get("Tag", "").replace("\n", " ").split(","))
        out.append(
            Package(
                name=pkg,
                source=rec.get("Source", pkg).split()[0],
                section=rec.get("Section", "").rpartition("/")[2],
                tags=tags - {""},
                text=text,
            )
        )
    return sorted(out, key=lambda p: p.name)


def label_of(task: Task, pkg: Package) -> str | None:
    """The package's label in ``task``, or None when it is not in the task."""
    if task.kind == "section":
        return pkg.section if pkg.section in task.labels else None
    if task.kind == "binary":
        if not pkg.tags or (task.within and task.within not in pkg.tags):
            return None
        tag = task.labels[0]
        short = tag.split("::")[1]
        return short if tag in pkg.tags else f"not-{short}"
    hits = [t for t in task.labels if t in pkg.tags]
    return hits[0].split("::")[1] if len(hits) == 1 else None


def task_rows(task: Task, pkgs: list[Package]) -> tuple[list[dict], list[dict]]:
    """Train and test rows of ``task``: split by source, each label subsampled to its cap."""
    by = {"train": {}, "test": {}}
    for p in pkgs:
        label = label_of(task, p)
        if label is None:
            continue
        part = "test" if in_test(p.source, TEST_FRACTION) else "train"
        by[part].setdefault(label, []).append({"text": p.text, "label": label, "package": p.name})
    rng = random.Random(f"{SEED}:{task.name}")
    out = []
    for part, total in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        n_labels = len(by["train"]) or 1
        cap = total // n_labels
        rows = []
        for label in sorted(by[part]):
            group = by[part][label]
            rows += group if len(group) <= cap else rng.sample(group, cap)
        out.append(sorted(rows, key=lambda r: r["package"]))
    return out[0], out[1]


def build_data(names: list[str], dump_path: Path | None) -> None:
    if dump_path:
        dump = dump_path.read_text(errors="replace")
    else:
        dump = subprocess.run(
            ["apt-cache", "dumpavail"], check=True, capture_output=True, text=True, errors="replace"
        ).stdout
    translated = translations()
    if not translated:
        print("no Translation-en lists: the texts are one-line synopses only")
    pkgs = packages(dump, translated)
    index_path = DATA / "tasks.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for task in TASKS:
        if task.name not in names:
            continue
        train, test = task_rows(task, pkgs)
        d = DATA / task.name
        d.mkdir(parents=True, exist_ok=True)
        write_jsonl_gz(train, d / "train.jsonl.gz")
        write_jsonl_gz(test, d / "test.jsonl.gz")
        ctr, cte = Counter(r["label"] for r in train), Counter(r["label"] for r in test)
        index[task.name] = {
            "description": task.description,
            "kind": task.kind,
            "source": list(task.labels) + ([f"within {task.within}"] if task.within else []),
            "labels": sorted(ctr),
            "train_counts": dict(sorted(ctr.items())),
            "test_counts": dict(sorted(cte.items())),
            "long_descriptions": bool(translated),
        }
        print(f"{task.name}: train {len(train)} {dict(ctr)}  test {len(test)} {dict(cte)}")
    order = [t.name for t in TASKS if t.name in index]
    index_path.write_text(json.dumps({k: index[k] for k in order}, indent=1) + "\n")


def task_seed(name: str) -> int:
    """Each task's own training seed (LoRA ``A`` init, head init, data order), fixed by its name.

    One seed for all tasks would start every adapter from the same ``A``, and the row space of
    ``Delta W = B A`` stays near that of the initial ``A`` in 120 steps (mean squared cosine of
    the principal angles 0.6-0.8 in the ``role`` and ``interface`` adapters, against 8/384 for
    random subspaces): the adapters would share input-side directions because of the
    initialization, not the tasks, which would confound any shared-subspace analysis.
    """
    return zlib.crc32(name.encode()) % 10_000


def run_one(name: str, log_dir: str) -> tuple[str, float]:
    """Train the adapter of task ``name`` in this (worker) process; log to ``log_dir``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from lorascope.train import load_config, train

    handler = logging.FileHandler(Path(log_dir) / f"{name}.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    overrides = [
        f"train_file='{DATA / name / 'train.jsonl.gz'}'",
        f"test_file='{DATA / name / 'test.jsonl.gz'}'",
        f"out_dir='{OUT / name}'",
        f"seed={task_seed(name)}",
        "threads=1",
        "progress=false",
    ]
    t0 = time.perf_counter()
    try:
        config = load_config(ZOO_TOML, overrides)
        logging.info("%s: %s", name, json.dumps(config.to_dict()))
        train(config)
    finally:  # a worker trains several tasks: one log file each
        logging.getLogger().removeHandler(handler)
        handler.close()
    return name, time.perf_counter() - t0


def table() -> str:
    """The task table, in Markdown, from tasks.json and each adapter's metrics.json."""
    index = json.loads((DATA / "tasks.json").read_text())
    head = (
        "| task | question | labels | train rows | test rows | seed | majority acc. (%) | "
        "test acc. (%) ± s.e. |\n|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, t in index.items():
        f = OUT / name / "metrics.json"
        if not f.exists():
            continue
        acc = json.loads(f.read_text())["accuracy"]
        seed = json.loads((OUT / name / "train_config.json").read_text())["seed"]
        train, test = t["train_counts"], t["test_counts"]
        n = sum(test.values())
        top = max(train, key=lambda k: (train[k], k))  # the training majority class
        majority = test.get(top, 0) / n
        se = (acc * (1 - acc) / n) ** 0.5  # binomial standard error of the test accuracy
        rows.append(
            f"| {name} | {t['description']} | {', '.join(t['labels'])} | "
            f"{sum(train.values())} | {n} | {seed} | {100 * majority:.1f} | "
            f"{100 * acc:.1f} ± {100 * se:.1f} |"
        )
    return head + "\n" + "\n".join(rows)


def write_table() -> None:
    readme = OUT / "README.md"
    start, end = "<!-- zoo:start -->", "<!-- zoo:end -->"
    text = readme.read_text() if readme.exists() else f"{start}\n{end}\n"
    before, _, rest = text.partition(start)
    _, _, after = rest.partition(end)
    readme.write_text(f"{before}{start}\n{table()}\n{end}{after}")


def main() -> None:
    names = [t.name for t in TASKS]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="parallel single-threaded runs")
    ap.add_argument("--only", nargs="*", choices=names, help="a subset of the tasks")
    ap.add_argument("--dump", type=Path, help="a saved `apt-cache dumpavail` (default: run it)")
    ap.add_argument("--force", action="store_true", help="retrain adapters that exist")
    ap.add_argument("--skip-data", action="store_true", help="reuse data/debian_zoo")
    ap.add_argument("--data-only", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--log-dir", default="build/zoo_logs")
    args = ap.parse_args()
    os.chdir(ROOT)
    chosen = args.only or names
    if not args.table_only:
        if not args.skip_data:
            build_data(chosen, args.dump)
        if args.data_only:
            return
        todo = [n for n in chosen if args.force or not (OUT / n / "metrics.json").exists()]
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, n, args.log_dir) for n in todo]
            for fut in as_completed(futures):
                name, secs = fut.result()
                acc = json.loads((OUT / name / "metrics.json").read_text())["accuracy"]
                print(f"{name}: test accuracy {acc:.3f}, {secs / 60:.1f} min", flush=True)
        print(f"{len(todo)} runs: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    write_table()
    print(table())


if __name__ == "__main__":
    main()
