"""The editor's slider round trip measured in a real browser: a click on a slider → the server
re-decodes → the new mesh reaches the GPU → the next frame. Headless Chromium, driven by Playwright.

    python tools/roundtrip.py                      # 40 clicks on index1 flexion; prints the medians
    python tools/roundtrip.py --fancy              # with shadows and reflections
    python tools/roundtrip.py --repeats 100 --hand_model data/hand_model

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

from common.errors import MissingFileError, exit_code  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Installed before the page's scripts: records every WebGL buffer upload (time, bytes), and after a
# pointer press, the times from the press to the upload of ``__meshBytes`` bytes (the new vertex
# positions reach the GPU, drawn in that frame) and to the next animation frame (by which that frame
# is on screen).
UPLOAD_HOOK = """
window.__uploads = [];
window.__roundTrips = [];
window.__mark = null;
window.__meshBytes = 0;
document.addEventListener('pointerdown', () => { window.__mark = performance.now(); }, true);
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
        requestAnimationFrame(() => window.__roundTrips.push([now - mark, performance.now() - mark]));
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
        raise MissingFileError("no Chromium found (install Debian's chromium package)")
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


def slider_track(page, slider):
    """The bounding box of a viser slider's track on the page."""
    return page.locator(f"[id='{slider._impl.uuid}'] .mantine-Slider-track").bounding_box()


def measure_round_trips(page, slider, vertex_num: int, repeats: int) -> list:
    """Click ``slider``'s track ``repeats`` times, alternately at 40 % and 60 % of its length (as a
    person would; the arrow keys would also turn viser's camera). For each click:
    ``[ms from the press to the new mesh's upload to WebGL, ms to the next frame]``."""
    page.evaluate(f"window.__meshBytes = {vertex_num * 3 * 4}; window.__roundTrips = [];")
    slider_thumb(page, slider).scroll_into_view_if_needed()  # a small window scrolls the panel
    track = slider_track(page, slider)
    for i in range(repeats):
        x = track["x"] + (0.4 if i % 2 == 0 else 0.6) * track["width"]
        page.mouse.click(x, track["y"] + track["height"] / 2)
        page.wait_for_function(f"window.__roundTrips.length >= {i + 1}", timeout=10_000)
        time.sleep(0.1)  # one change at a time, as a person's
    return page.evaluate("window.__roundTrips")


def save_screenshot(page, path: str) -> None:
    """A PNG of the page without viser's note on software rendering, the scene drawn to the end."""
    note = page.get_by_text("Software WebGL rendering detected")
    if note.count():
        note.locator("xpath=ancestor::div[contains(@class, 'mantine-Notification-root')]").locator(
            "button").first.click()
    time.sleep(2)
    page.screenshot(path=path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--hand_model")
    parser.add_argument("--pose", default="open", help="start pose (a preset or a pose file)")
    parser.add_argument("--screenshot", help="afterwards, save a PNG of the page here (the README's figure)")
    parser.add_argument("--fancy", action="store_true",
                        help="tick 'Shadows and reflections' first (off by default: slower without a GPU)")
    parser.add_argument("--width", type=int, default=1280, help="browser window size in pixels")
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args(argv)
    return exit_code(lambda: measure(args))


def measure(args) -> None:
    """Start the editor, click the slider ``--repeats`` times in headless Chromium, print the times."""
    from playwright.sync_api import sync_playwright

    from demo.editor import Editor, parse_args as editor_args

    editor = Editor(editor_args(["--port", "0", "--pose", args.pose] +
                                (["--hand_model", args.hand_model] if args.hand_model else [])))
    try:
        with tempfile.TemporaryDirectory(prefix="chromium_") as profile, sync_playwright() as pw:
            context = launch(pw, profile, args.width, args.height)
            page = context.new_page()
            page.add_init_script(UPLOAD_HOOK)
            page.goto(editor.url)
            session = wait_for(lambda: next(iter(editor.sessions.values()), None), what="the page to connect")
            slider = session.sliders[(editor.hand.joint_index("index1"), 2)]
            slider_thumb(page, slider).wait_for(timeout=30_000)
            if args.fancy:
                session.gui_fancy.value = True
            wait_for(lambda: page.evaluate(f"window.__uploads.some(u => u[1] === {editor.hand.vertex_num * 12})"),
                     what="the mesh to reach the GPU")
            times = measure_round_trips(page, slider, editor.hand.vertex_num, args.repeats)
            if args.screenshot:
                save_screenshot(page, args.screenshot)
            context.close()
    finally:
        editor.stop()
    upload = sorted(t[0] for t in times)
    frame = sorted(t[1] for t in times)
    q90 = lambda values: values[int(0.9 * (len(values) - 1))]  # noqa: E731
    print(f"hand model: {editor.hand.source} ({editor.hand.vertex_num} vertices); {len(times)} clicks on the "
          f"index1 flexion slider; headless Chromium, software WebGL ({args.width}x{args.height}), "
          f"{'shadows and reflections' if args.fancy else 'plain drawing (the default)'}")
    print(f"server side (decode + send): median {statistics.median(session.update_ms):.2f} ms")
    print(f"click -> new vertices uploaded to WebGL: median {statistics.median(upload):.0f} ms, "
          f"90th percentile {q90(upload):.0f} ms")
    print(f"click -> next frame (new mesh on screen): median {statistics.median(frame):.0f} ms, "
          f"90th percentile {q90(frame):.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
