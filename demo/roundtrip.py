"""The editor's slider round trip measured in a real browser: key press on a slider → the server
re-decodes → the new mesh reaches the GPU → the next frame. Headless Chromium, driven by Playwright.

    python demo/roundtrip.py                      # 40 presses on index1 flexion; prints the median
    python demo/roundtrip.py --repeats 100 --hand_model data/hand_model

Needs the ``playwright`` Python package and a Chromium (Debian's ``chromium`` package, at
``/usr/bin/chromium`` or on the PATH; Playwright's own browser download is not used). The browser
runs headless, with software WebGL, offline flags and a fresh profile; the editor runs in this
process on a free port of 127.0.0.1.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Installed before the page's scripts: records every WebGL buffer upload (time, bytes), and once a
# key press was marked, the time of the first animation frame after an upload of ``__meshBytes``
# bytes (the new vertex positions) — the frame that shows the new mesh has been drawn by then.
UPLOAD_HOOK = """
window.__uploads = [];
window.__roundTrips = [];
window.__mark = null;
window.__meshBytes = 0;
document.addEventListener('keydown', () => { window.__mark = performance.now(); }, true);
for (const C of [WebGLRenderingContext, WebGL2RenderingContext]) {
  for (const name of ['bufferData', 'bufferSubData']) {
    const original = C.prototype[name];
    C.prototype[name] = function (...args) {
      // bufferData(target, data | size, usage); bufferSubData(target, offset, data, ...)
      const data = name === 'bufferData' ? args[1] : args[2];
      const bytes = typeof data === 'number' ? data : (data ? data.byteLength : 0);
      const now = performance.now();
      window.__uploads.push([now, bytes]);
      if (window.__mark !== null && bytes === window.__meshBytes) {
        const mark = window.__mark;
        window.__mark = null;
        requestAnimationFrame(() => window.__roundTrips.push(performance.now() - mark));
      }
      return original.apply(this, args);
    };
  }
}
"""


def find_chromium() -> str | None:
    """The system Chromium (Debian's package), or None."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def launch(playwright, profile_dir: str, width: int = 1280, height: int = 800):
    """A headless Chromium context with a fresh profile in ``profile_dir`` (no network but localhost)."""
    executable = find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found (install Debian's chromium package)")
    return playwright.chromium.launch_persistent_context(
        profile_dir, executable_path=executable, args=CHROMIUM_FLAGS, headless=True,
        viewport={"width": width, "height": height})


def slider_thumb(page, slider):
    """The page element of a viser slider handle (its root element carries the handle's id)."""
    return page.locator(f"[id='{slider._impl.uuid}'] [role=slider]")


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition()`` until it returns a true value; that value, or TimeoutError."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def measure_round_trips(page, thumb, vertex_num: int, repeats: int, key: str = "ArrowRight") -> list:
    """Milliseconds from each key press on ``thumb`` to the first frame after the new mesh's upload."""
    page.evaluate(f"window.__meshBytes = {vertex_num * 3 * 4}; window.__roundTrips = [];")
    thumb.focus()
    for i in range(repeats):
        page.keyboard.press(key)
        page.wait_for_function(f"window.__roundTrips.length >= {i + 1}", timeout=10_000)
        time.sleep(0.05)  # one press at a time, as a person's
    return page.evaluate("window.__roundTrips")


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from demo.editor import Editor, parse_args as editor_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--hand_model")
    args = parser.parse_args(argv)
    editor = Editor(editor_args(["--port", "0", "--pose", "open"] +
                                (["--hand_model", args.hand_model] if args.hand_model else [])))
    try:
        with tempfile.TemporaryDirectory(prefix="chromium_") as profile, sync_playwright() as pw:
            context = launch(pw, profile)
            page = context.new_page()
            page.add_init_script(UPLOAD_HOOK)
            page.goto(editor.url)
            session = wait_for(lambda: next(iter(editor.sessions.values()), None), what="the page to connect")
            index1 = editor.hand.joint_index("index1")
            thumb = slider_thumb(page, session.sliders[(index1, 2)])
            thumb.wait_for(timeout=30_000)
            wait_for(lambda: page.evaluate(f"window.__uploads.some(u => u[1] === {editor.hand.vertex_num * 12})"),
                     what="the mesh to reach the GPU")
            times = measure_round_trips(page, thumb, editor.hand.vertex_num, args.repeats)
            context.close()
    finally:
        editor.stop()
    times = sorted(times)
    print(f"hand model: {editor.hand.source} ({editor.hand.vertex_num} vertices); {len(times)} key presses on "
          f"index1 flexion, headless Chromium (software WebGL)")
    print(f"round trip key press -> new mesh on screen: median {statistics.median(times):.1f} ms, "
          f"90th percentile {times[int(0.9 * (len(times) - 1))]:.1f} ms, max {times[-1]:.1f} ms; "
          f"server side (decode + send) median {statistics.median(session.update_ms):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
