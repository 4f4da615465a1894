"""The pose editor in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright
opens the page, moves the index finger's flexion slider, sees the mesh change (in the server's
state and in a screenshot), downloads the pose and feeds it to demo.py. Skips when Playwright or
Chromium is missing (.ci/run installs Chromium)."""
import time

import numpy as np
import pytest

pytest.importorskip("viser", reason="the editor needs viser (requirements.txt)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")

from demo import demo, editor as editor_module  # noqa: E402
from demo.pose_edit import pose_degrees, pose_yaml  # noqa: E402
from tools.roundtrip import (UPLOAD_HOOK, find_chromium, launch, measure_round_trips, slider_thumb,  # noqa: E402
                             slider_track, wait_for)
from tests.test_demo import read_obj  # noqa: E402

if find_chromium() is None:
    pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run does it)", allow_module_level=True)

SCENE_WIDTH = 900  # the 3D view left of the control panel, in the 1280-pixel-wide window


@pytest.fixture(scope="module")
def editor():
    ed = editor_module.Editor(editor_module.parse_args(["--port", "0", "--pose", "open"]))
    yield ed
    ed.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium_profile")  # a fresh profile
    with sync_api.sync_playwright() as pw:
        context = launch(pw, str(profile))
        yield context
        context.close()


def open_page(browser, editor):
    """A new tab on the editor; returns (page, its session, the URLs it requested)."""
    before = set(editor.sessions)
    page = browser.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.add_init_script(UPLOAD_HOOK)
    page.goto(editor.url)
    session = wait_for(lambda: next((s for k, s in editor.sessions.items() if k not in before), None),
                       what="the page's session")
    index1 = editor.hand.joint_index("index1")
    slider_thumb(page, session.sliders[(index1, 2)]).wait_for(timeout=60_000)
    mesh_bytes = editor.hand.vertex_num * 12
    page.wait_for_function(f"window.__uploads.some(u => u[1] === {mesh_bytes})", timeout=60_000)
    return page, session, requests


def record_two_keyframes(page, session, hand, preset: str) -> None:
    """Open the Animation folder, record the current pose, switch to the ``preset`` and record it."""
    page.get_by_text("Animation", exact=True).click()  # the folder starts closed
    page.get_by_role("button", name="Record keyframe").click()
    wait_for(lambda: len(session.keyframes.poses) == 1, what="keyframe 1")
    page.get_by_role("button", name=preset, exact=True).click()
    wait_for(lambda: np.array_equal(session.deg, pose_degrees(hand, preset)), what="the preset")
    page.get_by_role("button", name="Record keyframe").click()
    wait_for(lambda: len(session.keyframes.poses) == 2, what="keyframe 2")


def scene_shot(page, path):
    import cv2

    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": SCENE_WIDTH, "height": 800})
    return cv2.imread(str(path))


def skin_mask(img):
    """Pixels of the hand: warm, reddish (skin colour, lit or in shade), unlike the white/grey page."""
    b, g, r = (img[..., k].astype(int) for k in range(3))
    return (r - b > 30) & (r > 60)


def settled_shot(page, path):
    """A screenshot once two in a row agree (the scene has finished drawing)."""
    previous = scene_shot(page, path)
    for _ in range(40):
        time.sleep(0.25)
        current = scene_shot(page, path)
        if np.array_equal(current, previous):
            return current
        previous = current
    return previous


def test_slider_moves_the_finger_and_the_pose_reproduces_in_demo(browser, editor, tmp_path):
    page, session, requests = open_page(browser, editor)
    hand = editor.hand
    index1, tip = hand.joint_index("index1"), hand.joint_index("index_null")
    before = settled_shot(page, tmp_path / "before.png")
    assert skin_mask(before).sum() > 20_000, "the hand is not drawn"
    deg_before, verts_before, joints_before = session.deg.copy(), session.verts.copy(), session.joints.copy()

    # Move the slider like a person: click at 80 % of the index1 flexion track (-45…90 → 63°).
    slider = session.sliders[(index1, 2)]
    track = slider_track(page, slider)
    uploads = page.evaluate("window.__uploads.length")
    page.mouse.click(track["x"] + 0.8 * track["width"], track["y"] + track["height"] / 2)
    wait_for(lambda: session.deg[index1, 2] > 30, what="the server to receive the slider")
    assert abs(session.deg[index1, 2] - 63) < 2, session.deg[index1, 2]

    # The server's state: only that angle changed, the mesh is the decode of the new pose.
    changed = np.argwhere(session.deg != deg_before)
    assert changed.tolist() == [[index1, 2]]
    _, expected = editor.decode(session.deg)
    assert np.array_equal(session.verts, expected) and not np.array_equal(session.verts, verts_before)
    assert np.array_equal(session.mesh.vertices, editor.to_world(expected).astype(np.float32))
    assert session.joints[tip, 1] - joints_before[tip, 1] > 30  # the index tip moved towards the palm (+y)

    # The browser: the new vertices reached the GPU, and the picture of the hand changed.
    page.wait_for_function(f"window.__uploads.slice({uploads}).some(u => u[1] === {hand.vertex_num * 12})")
    after = settled_shot(page, tmp_path / "after.png")
    moved = skin_mask(before) != skin_mask(after)
    assert moved.sum() > 2_000, moved.sum()
    rows, cols = np.nonzero(moved)
    hand_rows = np.nonzero(skin_mask(before).any(1))[0]
    assert rows.mean() < hand_rows.mean()  # what changed is in the upper half (the fingers are up)

    # Download the pose and give it to demo.py: the same mesh, vertex for vertex.
    with page.expect_download() as download:
        page.get_by_role("button", name="Save the pose (YAML)").click()
    saved = tmp_path / "pose.yaml"
    download.value.save_as(saved)
    assert saved.read_text() == session.pose_text()
    assert demo.main(["--pose", str(saved), "--out", str(tmp_path / "demo")]) == 0
    v, _, _ = read_obj(tmp_path / "demo" / "mesh.obj")
    assert np.array_equal(v, session.verts)

    # The mesh download is the same OBJ as demo.py's.
    with page.expect_download() as download:
        page.get_by_role("button", name="Save the mesh (OBJ)").click()
    download.value.save_as(tmp_path / "mesh.obj")
    assert (tmp_path / "mesh.obj").read_text() == (tmp_path / "demo" / "mesh.obj").read_text()

    # Nothing was fetched from anywhere but the editor itself.
    outside = [u for u in requests if not u.startswith((editor.url, "data:", "blob:"))]
    assert outside == []
    page.close()


def test_bad_upload_keeps_the_pose_and_shows_the_demos_message(browser, editor, tmp_path, monkeypatch, capsys):
    page, session, _ = open_page(browser, editor)
    deg = session.deg.copy()
    upload = page.locator("input[type=file]")
    upload.set_input_files(files=[{"name": "bad.yaml", "mimeType": "application/x-yaml",
                                   "buffer": b"index1: [0, 0\n"}])
    page.get_by_text("error: bad.yaml: not valid YAML").first.wait_for(timeout=20_000)
    # the message demo.py prints for the same file, in the page
    (tmp_path / "bad.yaml").write_bytes(b"index1: [0, 0\n")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--pose", "bad.yaml", "--out", str(tmp_path / "o")]) == 2
    words = " ".join(capsys.readouterr().err.split())
    assert words in " ".join(page.inner_text("body").split())
    assert np.array_equal(session.deg, deg)

    upload.set_input_files(files=[{"name": "joint.yaml", "mimeType": "application/x-yaml",
                                   "buffer": b"b_r_index7: [0, 0, 10]\n"}])
    page.get_by_text("error: joint.yaml:1: unknown joint 'b_r_index7'", exact=False).first.wait_for(timeout=20_000)
    assert np.array_equal(session.deg, deg)

    fist = pose_degrees(editor.hand, "fist")
    fist[editor.hand.joint_index("index1"), 2] = 80.123456789  # kept to the last digit
    upload.set_input_files(files=[{"name": "fist.yaml", "mimeType": "application/x-yaml",
                                   "buffer": pose_yaml(editor.hand, fist).encode()}])
    wait_for(lambda: np.array_equal(session.deg, fist), what="the uploaded pose")
    page.close()


def test_tabs_have_their_own_pose_and_presets_apply(browser, editor):
    page1, session1, _ = open_page(browser, editor)
    page2, session2, _ = open_page(browser, editor)
    start = session2.deg.copy()
    page1.get_by_role("button", name="fist", exact=True).click()
    wait_for(lambda: np.array_equal(session1.deg, pose_degrees(editor.hand, "fist")), what="the preset")
    time.sleep(0.5)
    assert np.array_equal(session2.deg, start)
    page1.get_by_role("button", name="Random pose within the limits").click()
    wait_for(lambda: not np.array_equal(session1.deg, pose_degrees(editor.hand, "fist")), what="a random pose")
    page1.get_by_role("button", name="Reset (every angle 0)").click()
    wait_for(lambda: not session1.deg.any(), what="the reset")
    page1.close()
    page2.close()


def test_keyframes_make_an_animation(browser, editor, tmp_path):
    import imageio.v3 as iio

    page, session, _ = open_page(browser, editor)
    record_two_keyframes(page, session, editor.hand, "fist")
    with page.expect_download(timeout=120_000) as download:
        page.get_by_role("button", name="Download animation").click()
    assert download.value.suggested_filename == "animation.gif"
    download.value.save_as(tmp_path / "animation.gif")
    frames = iio.imread(tmp_path / "animation.gif", index=None)
    assert frames.shape[:3] == (21, 256, 768)  # 1 s at 20 fps from one pose to the next; palm, side, back
    page.close()


def test_round_trip(browser, editor):
    """Clicks on the index1 flexion slider → the new mesh on screen (measured, reported)."""
    page, session, _ = open_page(browser, editor)
    index1 = editor.hand.joint_index("index1")
    times = measure_round_trips(page, session.sliders[(index1, 2)], editor.hand.vertex_num, 6)
    assert len(times) == 6 and all(0 < upload <= frame for upload, frame in times)
    assert abs(session.deg[index1, 2] - (-45 + 0.6 * 135)) < 2  # the last click, at 60 % of -45…90
    print(f"click -> frame median {np.median([t[1] for t in times]):.0f} ms (software WebGL), "
          f"server side {np.median(session.update_ms):.2f} ms")
    page.close()


def test_display_toggles_limits_copy_and_render(browser, editor, tmp_path):
    import cv2

    from common.hand.joint_limits import FREE_RANGE_DEG

    page, session, _ = open_page(browser, editor)
    hand = editor.hand
    page.get_by_text("Skeleton (bones and joints)").click()
    wait_for(lambda: session.bones.visible and session.joint_dots.visible, what="the skeleton")
    world = editor.to_world(session.joints).astype(np.float32)
    assert np.array_equal(session.joint_dots.points, world)
    assert np.array_equal(session.bones.points, world[session.bone_pairs])
    page.get_by_text("Joint names").click()
    wait_for(lambda: all(label.visible for label in session.labels), what="the joint names")
    assert np.allclose([label.position for label in session.labels], editor.to_world(session.joints))
    page.get_by_text("Wireframe").click()
    wait_for(lambda: session.mesh.wireframe, what="the wireframe")
    page.get_by_text("Ground grid").click()
    wait_for(lambda: not session.grid.visible, what="the grid to go")

    # lifting the limits widens every slider; putting them back clamps the pose
    index1, index2 = hand.joint_index("index1"), hand.joint_index("index2")
    page.get_by_text("Lift the joint limits").click()
    # The server widens the sliders one after another: wait for the last, not the first.
    wait_for(lambda: all(s.min == -FREE_RANGE_DEG and s.max == FREE_RANGE_DEG for s in session.sliders.values()),
             what="the wider ranges")
    session.sliders[(index2, 2)].value = 150.0  # as if typed into the slider's box
    wait_for(lambda: session.deg[index2, 2] == 150.0, what="150°")
    page.get_by_text("Lift the joint limits").click()
    wait_for(lambda: session.deg[index2, 2] == 100.0, what="the clamp to 100°")
    page.get_by_text("brought back within them: b_r_index2 flexion 150° > 100°").first.wait_for()
    session.sliders[(index1, 2)].value = 120.0  # typed beyond the range: the limit is used, and shown
    wait_for(lambda: session.deg[index1, 2] == 90.0 and session.sliders[(index1, 2)].value == 90.0,
             what="the clamp to 90°")

    # copy the index's angles to the other fingers
    page.get_by_role("button", name="Copy the index's angles to the other fingers").click()
    middle2 = hand.joint_index("middle2")
    wait_for(lambda: session.deg[middle2, 2] == 100.0, what="the copy")

    # render.png as demo.py draws it
    with page.expect_download() as download:
        page.get_by_role("button", name="Save render.png").click()
    download.value.save_as(tmp_path / "render.png")
    expected = demo.render_pose(hand, session.verts, session.joints)
    assert np.array_equal(cv2.imread(str(tmp_path / "render.png")), expected)
    page.close()
