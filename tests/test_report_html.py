"""index.html and the captions of rectangular (GQA) projections.

The report is built from real PEFT adapters on a tiny Llama with grouped-query attention (hidden
64, 4 heads, 2 KV heads: q_proj 64×64, k_proj 32×64), built from a config. index.html is checked
without a browser (it parses, every image and link resolves, every table has the Markdown's
header) and in a real headless Chromium driven over the DevTools protocol (stdlib only): the
page loads without console errors, every image decodes, a screenshot is not blank. Each browser
check is also shown to fail on a page made to fail it.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lorascope.report import ReportOptions, build_report, compute_report, group_adapters
from lorascope.report.figures import report_figures
from lorascope.report.html import to_html
from lorascope.report.page import (
    NOT_SHOWN,
    Bullets,
    Code,
    Heading,
    Link,
    Page,
    Paragraph,
    TableBlock,
)
from lorascope.report.tables import Column, Table

HIDDEN, HEADS, KV_HEADS = 64, 4, 2
D_K = HIDDEN // HEADS * KV_HEADS  # k_proj: (32, 64), the GQA case
RUNS = ((2, 0), (8, 0), (8, 1))  # (r, seed)


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        bos_token_id=0,
        eos_token_id=0,
    )


def _train_tracked(model, path: Path) -> None:
    """12 AdamW steps of next-token loss on random tokens, tracked into ``path``."""
    from lorascope.tracking import Tracker

    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (4, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tracker = Tracker(path, every=2, factors_every=4)
    for step in range(1, 13):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
        tracker.step(model, step)
    tracker.close(model, 12)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A saved base model and three PEFT adapters (q_proj, k_proj) with seeded random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("gqa")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(root / "base")
    paths = []
    for r, seed in RUNS:
        cfg = LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "k_proj"])
        model = get_peft_model(LlamaForCausalLM(_llama_config()), cfg)
        g = torch.Generator().manual_seed(100 * r + seed)
        for name, p in model.named_parameters():
            if "lora_" in name:  # B = 0 at PEFT's init: give every update a direction
                p.data = torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in name else 1)
        if (r, seed) == RUNS[-1]:
            _train_tracked(model, root / "run.h5")
        model.save_pretrained(root / f"r{r}_s{seed}")
        paths.append(root / f"r{r}_s{seed}")
    assert model.base_model.model.model.layers[0].self_attn.k_proj.weight.shape == (D_K, HIDDEN)
    return root, paths, root / "base"


@pytest.fixture(scope="module")
def built(gqa, tmp_path_factory):
    root, paths, base = gqa
    run = root / "run.h5"
    out = tmp_path_factory.mktemp("gqa_report")
    seeds = [s for _, s in RUNS]
    report = build_report(paths, base, out_dir=out, seeds=seeds, tracking=run, dpi=50,
                          progress=False)  # fmt: skip
    return report, out


# --- GQA captions -------------------------------------------------------------------------


def _dims(report) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) per kind, read from the adapter's modules (not from the report)."""
    ad = report.data.members[0].adapter
    return {k: (ad.select(module=k)[0].d_out, ad.select(module=k)[0].d_in) for k in ("q", "k")}


def _levels(caption: str) -> dict[str, tuple[int, int, float]]:
    """``a/b = x (label)`` items of a caption, by label."""
    found = re.findall(r"(\d+)/(\d+) = ([0-9.]+) \(([^)]+)\)", caption)
    return {label: (int(a), int(b), float(x)) for a, b, x, label in found}


@pytest.mark.slow  # builds a report
def test_fig8_caption_random_level_per_kind_right_side(built):
    report, _ = built
    dims = _dims(report)
    assert dims == {"q": (HIDDEN, HIDDEN), "k": (D_K, HIDDEN)}
    caption = report.captions["fig8_weight_similarity"]
    levels = _levels(caption.split("random: ")[1])
    assert set(levels) == {"q", "k"}, caption
    top = report.data.options.weight_top
    for kind, (d_out, d_in) in dims.items():
        i = min(top, d_out, d_in)  # W has min(d_out, d_in) singular directions
        n = d_in  # right side: directions in R^d_in
        want = max(i, max(r for r, _ in RUNS)) / n  # E φ(i, j) = max(i, j)/n
        a, b, x = levels[kind]
        assert (a, b) == (max(i, 8), n) and x == pytest.approx(want, abs=6e-4), caption
    assert levels["k"][2] == pytest.approx(0.5, abs=6e-4)  # 32 of W_k's directions in R^64
    assert f"i ≤ {HIDDEN} (q), {D_K} (k)" in caption


@pytest.mark.slow  # builds a report
def test_gqa_captions_left_side_factor_b(gqa):
    """Output-side directions live in R^d_out: 64 for q, 32 for k (B's factor, W's left side);
    W's top-4 against r = 8 gives max(4, 8)/n per rank."""
    _, paths, base = gqa
    members = group_adapters(paths, [s for _, s in RUNS])
    options = ReportOptions(side="left", factor="B", weight_top=4, progress=False)
    data = compute_report(members, base, options)
    figs = {f.name: f.caption for f in report_figures(data)}
    n = {"q": HIDDEN, "k": D_K}  # d_out
    fig3 = figs["fig3_rank_similarity"]
    assert "left-singular directions of B" in fig3
    levels = _levels(fig3.split("at (1, 1) ")[1])
    for kind in ("q", "k"):
        assert levels[kind] == (1, n[kind], pytest.approx(1 / n[kind], abs=6e-4)), fig3
    fig4 = figs["fig4_seed_similarity"]
    i, j = np.indices((8, 8)) + 1
    for kind in ("q", "k"):
        want = float(np.mean(np.maximum(i, j))) / n[kind]
        got = re.search(rf"([0-9.]+) \({kind}, n = {n[kind]}\)", fig4)
        assert got and float(got.group(1)) == pytest.approx(want, abs=6e-4), fig4
    fig8 = figs["fig8_weight_similarity"]
    levels = _levels(fig8.split("random: ")[1])
    for kind in ("q", "k"):
        for r in (2, 8):
            a, b, x = levels[f"{kind}, r={r}"]
            assert (a, b) == (max(4, r), n[kind]), fig8
            assert x == pytest.approx(max(4, r) / n[kind], abs=6e-4), fig8


@pytest.mark.slow  # builds a report
def test_table7_random_level_is_r_frobenius_over_sqrt_dout_din(built, gqa):
    """‖UᵀWV‖_F for random r-frames ≈ r‖W‖_F/√(d_out·d_in): the closed form exactly, and the
    measured value near it (r = 8: a chi with 64 degrees of freedom, about ±9 %)."""
    import csv

    from safetensors.torch import load_file

    _, out = built
    weights = load_file(str(gqa[2] / "model.safetensors"))
    rows = list(csv.DictReader((out / "table7_layers.csv").open()))
    assert {r["kind"] for r in rows} == {"q", "k"}
    measured = {"q": [], "k": []}
    for row in rows:
        proj = "k_proj" if row["kind"] == "k" else "q_proj"
        W = weights[f"model.layers.{row['layer']}.self_attn.{proj}.weight"].double()
        d_out, d_in = W.shape
        r = int(row["rank"])
        want = r * float(torch.linalg.matrix_norm(W)) / np.sqrt(d_out * d_in)
        assert float(row["random_expected"]) == pytest.approx(want, rel=1e-9)
        if r == 8:
            measured[row["kind"]].append(float(row["proj_random"]) / want)
    for kind, ratios in measured.items():
        assert len(ratios) == 4 and 0.75 < np.mean(ratios) < 1.25, (kind, ratios)


# --- index.html without a browser ----------------------------------------------------------


class _Page(HTMLParser):
    """Images, links, tables (header cells, body rows), scripts and text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: list[str] = []
        self.hrefs: list[str] = []
        self.tables: list[dict] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._where = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag in ("a", "link"):
            self.hrefs.append(a.get("href", ""))
        elif tag == "table":
            self.tables.append({"head": [], "rows": 0})
        elif tag in ("thead", "tbody"):
            self._where = tag
        elif tag == "tr" and self._where == "tbody":
            self.tables[-1]["rows"] += 1
        elif tag == "th":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "th" and self._cell is not None:
            self.tables[-1]["head"].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(out: Path) -> _Page:
    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    page.close()
    return page


def _md_headers(text: str) -> list[list[str]]:
    lines = text.splitlines()
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line, rule in itertools.pairwise(lines)
        if line.startswith("| ") and rule.startswith("|---")
    ]


@pytest.mark.slow  # builds a report
def test_index_html_parses_and_everything_it_names_exists(built):
    report, out = built
    assert out / "index.html" in report.files and out / "index.md" in report.files
    page = _parse(out)
    assert "script" not in page.tags and "iframe" not in page.tags
    figures = [p.stem for p in out.glob("*.png")]
    assert sorted(Path(s).stem for s in page.imgs) == sorted(figures)
    assert len(figures) == len(report.captions) >= 12  # report, shared and dynamics figures
    for src in page.imgs:
        assert not re.match(r"[a-z]+:", src) and (out / src).read_bytes()[:4] == b"\x89PNG"
    for href in page.hrefs:
        assert href == "data:," or (out / href).is_file(), href  # no network, nothing missing
    text = re.sub(r"\s+", " ", "".join(page.text))
    for caption in report.captions.values():
        assert caption in text
    for line in report.dynamics.results[0].advice():
        assert line in text  # the tracking section's advice, quotes and braces included
    assert "Training dynamics" in text and "weight_top" in text  # the section, the options
    # every table: the Markdown's header, and as many rows as its CSV
    heads = [t["head"] for t in page.tables]
    md_tables = sorted(out.glob("*.md"))
    md_tables.remove(out / "index.md")
    assert len(page.tables) == len(md_tables) + 2  # + the adapters and the options
    for md in md_tables:
        (head,) = _md_headers(md.read_text())
        (table,) = [t for t in page.tables if t["head"] == head]
        assert table["rows"] == len((out / f"{md.stem}.csv").read_text().splitlines()) - 1
    for head in _md_headers((out / "index.md").read_text()):
        assert head in heads
    assert ["option", "value"] in heads and heads[0][:2] == ["adapter", "path"]
    (options,) = [t for t in page.tables if t["head"] == ["option", "value"]]
    shown = set(report.data.options.to_dict()) - set(NOT_SHOWN)
    assert options["rows"] == len(shown) and "progress" not in shown


@pytest.mark.slow  # builds a report
def test_index_files_are_the_same_bytes_on_a_second_run(built, gqa, tmp_path):
    report, out = built
    _, paths, base = gqa
    again = build_report(paths, base, out_dir=tmp_path, seeds=[s for _, s in RUNS],
                         tracking=report.dynamics.path, dpi=50, progress=False)  # fmt: skip
    assert {p.name for p in again.files} == {p.name for p in report.files}
    for name in ("index.html", "index.md", "fig8_weight_similarity.png", "table7.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    html = (out / "index.html").read_text()
    assert str(out) not in html and str(tmp_path) not in html


def test_html_escapes_all_text():
    table = Table("t<1>", "a <b> & c", [Column("k", "x<y"), Column("p", "p", code=True)],
                  [["<i>", "a&b"]])  # fmt: skip
    page = Page(
        "<title>",
        [
            Heading(2, "<h2>"),
            Paragraph(("1 < 2 & ", Code("<code>"), Link("<a>", 'x".html'))),
            Bullets((("<li>",),)),
            TableBlock(table, full=False),
        ],
    )
    html = to_html(page)
    parsed = _Page()
    parsed.feed(html)
    assert parsed.tags >= {"details", "table", "code", "a"} and "i" not in parsed.tags
    assert "b" not in parsed.tags and "li" in parsed.tags
    for s in ("&lt;title&gt;", "&lt;h2&gt;", "1 &lt; 2 &amp; ", "&lt;code&gt;", "x&quot;.html",
              "a &lt;b&gt; &amp; c", "x&lt;y", "&lt;i&gt;", "<code>a&amp;b</code>"):  # fmt: skip
        assert s in html, s
    assert parsed.tables == [{"head": ["x<y", "p"], "rows": 1}]


# --- index.html in headless Chromium ---------------------------------------------------------

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.access(p, os.X_OK)),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not found: apt-get install chromium"
)
TIMEOUT = 60.0


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (DevTools protocol: JSON
    messages ending in NUL, read on fd 3, written on fd 4 of the browser)."""

    def __init__(self, profile: Path, log: Path) -> None:
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()

        def fds() -> None:  # in the child, before exec
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        args = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--mute-audio",
            "--hide-scrollbars", "--window-size=1200,1600", "about:blank",
        ]  # fmt: skip
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(3, 4),
            preexec_fn=fds,  # dup2 onto fds 3 and 4; close_fds runs after it
        )
        os.close(to_browser)
        os.close(from_browser)
        self.log_path, self._buf, self._id, self.events = log, b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise TimeoutError(f"chromium: no answer; log: {self._tail()}")
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited; log: {self._tail()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._in, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read(deadline))

    def open(self, url: str) -> dict:
        """Load ``url``; its console errors, its images and a screenshot."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        images = self.call(
            "Runtime.evaluate",
            session=True,
            expression="Promise.all(Array.from(document.images, im => im.decode().then("
            "() => [im.getAttribute('src'), im.naturalWidth, im.naturalHeight], "
            "() => [im.getAttribute('src'), 0, 0])))",
            awaitPromise=True,
            returnByValue=True,
        )["result"]["value"]
        shot = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        errors = [
            e["params"]
            for e in self.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        ]
        return {"errors": errors, "images": images, "screenshot": base64.b64decode(shot)}

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._in, self._out):
            os.close(fd)
        self._log.close()


def _blank(png: bytes) -> bool:
    """True if the image is one flat colour (pixel standard deviation under 1 %)."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")[..., :3]  # (h, w, 3) in [0, 1]
    return float(pixels.std()) < 0.01


@needs_chromium
@pytest.mark.slow  # builds a report
def test_index_html_in_headless_chromium(built, tmp_path):
    _, out = built
    browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        page = browser.open((out / "index.html").as_uri())
        # the same checks on pages made to fail them: each check can fail
        broken = out / "broken.html"
        html = (out / "index.html").read_text()
        broken.write_text(html.replace('src="spectra.png"', 'src="missing.png"', 1))
        bad = browser.open(broken.as_uri())
        blank = browser.open("about:blank")
    finally:
        browser.close()
        (out / "broken.html").unlink(missing_ok=True)
    assert page["errors"] == [], page["errors"]
    assert len(page["images"]) == len(list(out.glob("*.png"))) >= 12
    for src, width, height in page["images"]:
        assert width > 0 and height > 0, src
    assert page["screenshot"][:8] == b"\x89PNG\r\n\x1a\n" and not _blank(page["screenshot"])
    assert any("missing.png" in json.dumps(e) for e in bad["errors"]), bad["errors"]
    assert ["missing.png", 0, 0] in bad["images"]
    assert _blank(blank["screenshot"])
