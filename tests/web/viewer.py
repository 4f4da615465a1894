"""The three.js test page (viewer.html) served from this folder, opened in headless Chromium: the
export's browser test uses it, and it makes the screenshot of docs/export.png::

    python tests/web/viewer.py output/poses.glb docs/export.png --times 0 1 2 --skeleton

Everything is served from this machine (three.js from ``node_modules``, installed by
``npm ci --prefix tests/web``); the browser is Debian's Chromium, as the editor's browser test.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import sys
import tempfile
import threading
import time
from pathlib import Path

WEB = Path(__file__).resolve().parent
ROOT = WEB.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREE = WEB / "node_modules" / "three" / "build" / "three.module.js"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """This folder at ``/``; the files to show at ``/files/NAME``."""

    def __init__(self, *args, files: Path, **kwargs):
        self.files = files
        super().__init__(*args, directory=str(WEB), **kwargs)

    def translate_path(self, path):
        if path.startswith("/files/"):
            return str(self.files / Path(path.split("?")[0][len("/files/"):]).name)
        return super().translate_path(path)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(files: Path):
    """An HTTP server on a free port of 127.0.0.1; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, files=Path(files)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def open_viewer(context, base: str, name: str, **params):
    """viewer.html showing ``/files/name``, loaded; returns (page, the URLs it requested)."""
    page = context.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    query = "&".join(f"{k}={v}" for k, v in {"file": f"/files/{name}", **params}.items())
    page.goto(f"{base}/viewer.html?{query}")
    page.wait_for_function("window.viewerReady === true || window.viewerError !== undefined", timeout=120_000)
    error = page.evaluate("window.viewerError")
    if error is not None:
        raise RuntimeError(f"three.js could not open {name}: {error}")
    return page, requests


def canvas_shot(page, path) -> None:
    """A PNG of the page's canvas, once the scene is drawn."""
    time.sleep(0.3)
    page.locator("canvas").screenshot(path=str(path))


def screenshots(glb: Path, out: Path, times, skeleton: bool = False, size: int = 420) -> None:
    """The file at each of ``times`` (s), side by side in one PNG."""
    import cv2
    import numpy as np
    from playwright.sync_api import sync_playwright

    from tools.roundtrip import launch

    with tempfile.TemporaryDirectory(prefix="viewer_") as folder, serve(Path(glb).parent) as base, \
            sync_playwright() as pw:
        context = launch(pw, str(Path(folder) / "profile"), width=size + 40, height=size + 40)
        page, _ = open_viewer(context, base, Path(glb).name, width=size, height=size,
                              skeleton=int(skeleton))
        panels = []
        for i, t in enumerate(times):
            page.evaluate(f"viewer.setTime({float(t)})")
            canvas_shot(page, Path(folder) / f"{i}.png")
            panels.append(cv2.imread(str(Path(folder) / f"{i}.png")))
        context.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.concatenate(panels, axis=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("glb", type=Path)
    parser.add_argument("out", type=Path, help="PNG: the panels side by side")
    parser.add_argument("--times", type=float, nargs="+", default=[0.0], help="animation times (s), one panel each")
    parser.add_argument("--skeleton", action="store_true", help="draw the bones through a see-through skin")
    parser.add_argument("--size", type=int, default=420, help="side of a panel in pixels")
    args = parser.parse_args(argv)
    screenshots(args.glb, args.out, args.times, args.skeleton, args.size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
