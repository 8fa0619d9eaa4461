"""Open the built docs in headless Chromium with no network, and report what the pages show.

Not part of the build or CI (Chromium is a Debian package, not a Python dependency); run it by hand
after ``mkdocs build``, as root, inside a network namespace that has only the loopback device::

    apt-get install -y chromium
    mkdocs build -d /tmp/site
    unshare -n python docs/_browser_check.py /tmp/site /tmp/shots

It serves the site on 127.0.0.1 and, for each page below, lets Chromium run the page's scripts,
then reads the resulting DOM: the number of formulas in the page (arithmatex elements), how many
MathJax rendered (``mjx-container``) and how many it could not (``mjx-merror``), whether the
browser fetched MathJax's fonts from the site (without them the formulas are blank), whether the
tutorial's code was included (an expected line, and no snippet marker left), and whether raw TeX
is still visible. It writes a screenshot of each page to the output folder and exits 1 if a page
fails. Flags as Debian's Chromium needs them headless, with every background request switched off.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

PAGES = {  # page: a line of code that must be on it
    "quickstart/": "def relative_error",
    "tutorials/rank_discovery/": "def make_tensor",
    "tutorials/lowrank_approximation/": "def approximation_problem",
    "tutorials/tensor_completion/": "def make_data",
    "concepts/": None,
    "tdlrt/": None,
    "torch/": None,
    "reference/torch/": "Rank-adaptive, geometry-aware training of the Tucker layers",
    "reference/geoopt/": "Tensors of fixed multilinear rank, as a geoopt manifold",
}
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        _QuietHandler.requested.append(self.path)


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _chromium(*args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    run = subprocess.run(
        [browser, *FLAGS, *args], capture_output=True, text=True, timeout=180, check=False
    )
    return run.stdout


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style|mjx-container)\b.*?</\1>", "", dom, flags=re.DOTALL)
    return re.sub(r"<[^>]+>", "", dom)


def main(site: Path, out: Path) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)  # in a fresh namespace
    out.mkdir(parents=True, exist_ok=True)
    server, port = _serve(site)
    failed = 0
    try:
        for page, code in PAGES.items():
            _QuietHandler.requested.clear()
            url = f"http://127.0.0.1:{port}/{page}"
            dom = _chromium("--dump-dom", url)
            name = page.strip("/").replace("/", "_") or "index"
            shot = out / f"{name}.png"
            _chromium(f"--screenshot={shot}", "--window-size=1280,2000", url)
            formulas = len(re.findall(r'class="arithmatex"', dom))
            rendered = len(re.findall(r"<mjx-container\b", dom))
            errors = len(re.findall(r"<mjx-merror\b", dom))
            fonts = {Path(p).name for p in _QuietHandler.requested if p.endswith(".woff")}
            text_fonts = {"MathJax_Main-Regular.woff", "MathJax_Math-Italic.woff"} & fonts
            text = _text(dom)
            raw_tex = bool(re.search(r"\\\(|\\\[", text))
            snippet_left = bool(re.search(r"-\s*-\s*8\s*(<|&lt;)", text))
            has_code = code is None or code in text
            ok = (
                rendered == formulas
                and (bool(text_fonts) or not formulas)
                and not errors
                and not raw_tex
                and not snippet_left
                and has_code
                and bool(dom)
            )
            failed += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {page:34s} formulas {formulas:3d}, rendered "
                f"{rendered:3d}, errors {errors}, raw TeX visible {raw_tex}, snippet marker left "
                f"{snippet_left}, code {'-' if code is None else has_code}, MathJax fonts "
                f"{len(fonts)}  -> {shot}"
            )
    finally:
        server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
