"""The exported .glb in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
opens a small three.js page (tests/web/viewer.html; three.js from npm, served from this machine,
nothing fetched elsewhere), plays the animation, and at two keyframes reads back the vertices three.js
skins: they equal glTF's formula with the four influences three.js keeps, the hand moved between
them, and the screenshots show it. Skips without Playwright, Chromium or the npm packages
(.ci/run installs them)."""
import time

import numpy as np
import pytest
import torch

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")

from demo import export as export_script  # noqa: E402
from tools.roundtrip import find_chromium, launch  # noqa: E402
from tests.gltf_reference import GltfFile  # noqa: E402
from tests.test_export import decoded, model_vertices, personalised_model, save_decoder  # noqa: E402
from tests.web.viewer import THREE, canvas_shot, open_viewer, serve  # noqa: E402

if find_chromium() is None:
    pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run does it)", allow_module_level=True)
if not THREE.is_file():
    pytest.skip("three.js is not installed in tests/web (npm ci --prefix tests/web; .ci/run does it)",
                allow_module_level=True)

KEYFRAMES = ("open", "fist", "ok")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = tmp_path_factory.mktemp("served")
    with serve(files) as base:
        yield base, files


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_api.sync_playwright() as pw:
        context = launch(pw, str(profile), width=800, height=800)
        yield context
        context.close()


def skin_pixels(image):
    """Pixels of the hand: warm and reddish, unlike the grey-white background."""
    r, g, b = (image[..., k].astype(int) for k in range(3))
    return (r - b > 25) & (r > 60)


def screenshot(page, path):
    import cv2

    canvas_shot(page, path)
    return cv2.imread(str(path))[..., ::-1]


def test_three_js_plays_the_animation_and_skins_as_glTF(server, browser, tmp_path, default_hand, default_hand_dir,
                                                        small_cfg):
    base, files = server
    model = personalised_model(default_hand, small_cfg)
    ckpt = save_decoder(model, tmp_path / "snapshot.pth.tar")
    out = files / "keyframes.glb"
    assert export_script.main(["--hand_model", str(default_hand_dir), "--ckpt", str(ckpt), "--poses", *KEYFRAMES,
                               "--out", str(out)]) == 0
    f = GltfFile(out.read_bytes())
    page, requests = open_viewer(browser, base, out.name, width=640, height=480)
    assert all(r.startswith(base) for r in requests), [r for r in requests if not r.startswith(base)]
    viewer = page.evaluate("({d: viewer.duration, n: viewer.vertexCount, k: viewer.influencesPerVertex})")
    assert viewer == {"d": 2.0, "n": len(model_vertices(f, default_hand)), "k": 4}

    # It plays: the animation's clock runs with the page's.
    first = page.evaluate("viewer.time()")
    time.sleep(1.0)
    assert page.evaluate("viewer.time()") > first + 0.2

    # At two keyframes: what three.js skins (four influences, renormalised) equals glTF's formula with
    # the first set of four; and the decode to within what dropping the fifth influence costs.
    euler = torch.cat([export_script.build_pose(default_hand, p) for p in KEYFRAMES])
    expected = decoded(model, euler)[:, model_vertices(f, default_hand)]
    mesh_node = next(i for i, n in enumerate(f.doc.nodes) if n.skin is not None)
    shots = []
    for k in (0, 1, 2):
        page.evaluate(f"viewer.setTime({float(k)})")
        got = np.asarray(page.evaluate("viewer.skinnedPositions()")).reshape(-1, 3) * 1e3
        trs, weights = f.sample(0, float(k))
        four = f.skinned(trs, weights.get(mesh_node), max_influences=4) * 1e3
        assert np.abs(got - four).max() < 1e-3, k
        every = f.skinned(trs, weights.get(mesh_node)) * 1e3
        assert np.abs(every - expected[k]).max() < 1e-3
        loss = np.abs(got - expected[k]).max()
        assert loss <= np.abs(four - expected[k]).max() + 1e-3 and loss < 2.0, loss
        shots.append(screenshot(page, tmp_path / f"key{k}.png"))
    moved = np.linalg.norm(expected[1] - expected[0], axis=1).max()
    assert moved > 50
    hands = [skin_pixels(s) for s in shots]
    assert all(h.mean() > 0.03 for h in hands), [h.mean() for h in hands]  # the hand is drawn
    assert (hands[0] != hands[1]).mean() > 0.02  # and it moved
    page.close()


# ------------------------------------------------------------------ the editor's downloads
@pytest.fixture(scope="module")
def editor():
    pytest.importorskip("viser", reason="the editor needs viser (requirements.txt)")
    from demo import editor as editor_module

    ed = editor_module.Editor(editor_module.parse_args(["--port", "0", "--pose", "open"]))
    yield ed
    ed.stop()


def test_editor_downloads_the_pose_and_keyframes_as_glb(browser, editor, tmp_path):
    from demo.pose_edit import pose_degrees
    from tests.test_editor_browser import open_page, record_two_keyframes, wait_for

    page, session, _ = open_page(browser, editor)
    hand = editor.hand
    page.get_by_role("button", name="fist", exact=True).click()
    wait_for(lambda: np.array_equal(session.deg, pose_degrees(hand, "fist")), what="the preset")
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Save the rigged hand (.glb)").click()
    assert download.value.suggested_filename == "hand.glb"
    download.value.save_as(tmp_path / "hand.glb")
    f = GltfFile((tmp_path / "hand.glb").read_bytes())
    _, verts = editor.decode(session.deg)
    assert np.abs(f.skinned(f.node_trs()) * 1e3 - verts[model_vertices(f, hand)]).max() < 1e-3

    # The recorded keyframes as an animation, "seconds per pose" apart (1 s).
    record_two_keyframes(page, session, hand, "ok")
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Download the rigged animation (.glb)").click()
    assert download.value.suggested_filename == "animation.glb"
    download.value.save_as(tmp_path / "animation.glb")
    f = GltfFile((tmp_path / "animation.glb").read_bytes())
    mesh_node = next(i for i, n in enumerate(f.doc.nodes) if n.skin is not None)
    for t, pose in ((0.0, "fist"), (1.0, "ok")):
        trs, weights = f.sample(0, t)
        _, verts = editor.decode(pose_degrees(hand, pose))
        got = f.skinned(trs, weights.get(mesh_node)) * 1e3
        assert np.abs(got - verts[model_vertices(f, hand)]).max() < 1e-3, pose
    page.close()
