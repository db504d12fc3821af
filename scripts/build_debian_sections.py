"""Build the Debian-sections text-classification data set from the local APT package lists.

Task: given a package's description, predict its archive section (games, graphics, mail,
science, sound, text). Input is the output of ``apt-cache dumpavail`` (run ``apt-get update``
first) for the packages and sections, with the long descriptions from APT's ``Translation-en``
lists (``dumpavail`` carries only the one-line synopsis and ``Description-md5``; Docker images
skip the translations unless ``apt-get update -o Acquire::Languages=en`` fetches them); output is
``train.jsonl.gz`` and ``test.jsonl.gz`` of ``{"text", "label", "package"}``.

Packages built from the same source package share wording, so the split is by *source*
package (a hash of its name), never by binary package: no source is in both splits. Binary
packages whose description repeats one already kept are dropped, and so are debug symbols.

Usage::

    apt-get update -o Acquire::Languages=en
    python scripts/build_debian_sections.py --out data/debian_sections
    # or from a saved dump: apt-cache dumpavail > dump.txt; ... --dump dump.txt
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

SECTIONS = ("games", "graphics", "mail", "science", "sound", "text")
MAX_CHARS = 320  # the classifier reads 64 tokens (~250 characters); keep the files small


def records(dump: str):
    """Yield one ``{field: value}`` dict per stanza of a Debian control-file dump."""
    for stanza in dump.split("\n\n"):
        rec: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                rec[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                rec[key] = value.strip()
        if rec:
            yield rec


def description_text(desc: str) -> str:
    """Short description + long description as one line, cut at a word near ``MAX_CHARS``."""
    short, _, long = desc.partition("\n")
    lines = [ln.strip() for ln in long.splitlines()]
    body = " ".join(ln for ln in lines if ln and ln != ".")
    text = re.sub(r"\s+", " ", f"{short.strip()}. {body}").strip()
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0]
    return text


def in_test(source: str, test_fraction: float) -> bool:
    """Deterministic split by source package name."""
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < test_fraction


def translations() -> str:
    """The text of APT's English ``Translation-en`` lists (empty when none were fetched)."""
    lang = ["-o", "Acquire::Languages=en"]
    files = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(FILENAME)", "Identifier: Translations", *lang],
        capture_output=True,
        text=True,
    ).stdout.split()
    out = [
        subprocess.run(
            ["/usr/lib/apt/apt-helper", "cat-file", f],
            capture_output=True,
            text=True,
            errors="replace",
        ).stdout
        for f in files
        if Path(f).exists()
    ]
    return "\n\n".join(out)


def build(
    dump: str, translated: str = "", test_fraction: float = 0.2
) -> tuple[list[dict], list[dict]]:
    long = {
        r["Description-md5"]: r["Description-en"]
        for r in records(translated)
        if "Description-md5" in r and "Description-en" in r
    }
    seen_pkg: set[str] = set()
    seen_text: set[str] = set()
    train, test = [], []
    for rec in records(dump):
        pkg, section = rec.get("Package", ""), rec.get("Section", "").rpartition("/")[2]
        if section not in SECTIONS or pkg in seen_pkg or "Description" not in rec:
            continue
        if pkg.endswith(("-dbg", "-dbgsym")):
            continue
        seen_pkg.add(pkg)
        text = description_text(long.get(rec.get("Description-md5", ""), rec["Description"]))
        if text.lower() in seen_text or len(text) < 20:
            continue
        seen_text.add(text.lower())
        source = rec.get("Source", pkg).split()[0]
        row = {"text": text, "label": section, "package": pkg}
        (test if in_test(source, test_fraction) else train).append(row)
    key = lambda r: r["package"]  # noqa: E731
    return sorted(train, key=key), sorted(test, key=key)


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    # mtime=0: the same rows give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/debian_sections"))
    ap.add_argument("--dump", type=Path, help="a saved `apt-cache dumpavail` (default: run it)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    args = ap.parse_args()
    if args.dump:
        dump = args.dump.read_text(errors="replace")
    else:
        dump = subprocess.run(
            ["apt-cache", "dumpavail"], check=True, capture_output=True, text=True, errors="replace"
        ).stdout
    translated = translations()
    if not translated:
        print("no Translation-en lists: run apt-get update -o Acquire::Languages=en for long texts")
    train, test = build(dump, translated, args.test_fraction)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(train, args.out / "train.jsonl.gz")
    write_jsonl_gz(test, args.out / "test.jsonl.gz")
    for name, rows in (("train", train), ("test", test)):
        counts = Counter(r["label"] for r in rows)
        print(f"{name}: {len(rows)} rows  " + "  ".join(f"{k}={counts[k]}" for k in SECTIONS))


if __name__ == "__main__":
    main()
