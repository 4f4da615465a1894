"""The pose editor in the browser: move a slider, see the hand change.

    python demo/editor.py                          # then open the printed URL (http://127.0.0.1:8080)
    python demo/editor.py --pose fist --port 8090
    python demo/editor.py --hand_model data/hand_model --subject 4 --test_epoch 34

A web page (``viser``; its web client ships inside the Python package, nothing is downloaded)
shows the posed mesh and one slider per degree of freedom, grouped by finger, in degrees, within
the joint limits of :mod:`common.hand.joint_limits` (a switch lifts them). Every change re-decodes the
mesh with the model, exactly as ``demo.py`` does. The page also has the presets, reset, a random
pose, copying one finger's angles to the others, saving the pose (YAML that ``demo.py --pose``
reads), the mesh (OBJ), ``render.png`` and the rigged hand (``.glb``, :mod:`demo.export`), loading a
pose file, and keyframes for an animation (:mod:`demo.animate`: GIF, MP4, or a rigged ``.glb``).
Each browser tab has its own pose.
"""
from __future__ import annotations

import html
import logging
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.errors import DeepHandMeshError, one_line  # noqa: E402
from common.hand.hand_model import save_obj  # noqa: E402
from common.hand.pose_io import PoseError, preset_names  # noqa: E402
from common.utils.vis import save_image  # noqa: E402
from demo import animate, export  # noqa: E402
from demo.demo import (check_model_args, decode_pose, load_model, model_and_pose_parser, render_pose,  # noqa: E402
                       script_main)
from common.hand.joint_limits import AXIS_NAMES, joint_limits_deg, limit_violations  # noqa: E402
from demo.pose_edit import (angle_dofs, clamp, copy_finger, euler_tensor, pose_degrees,  # noqa: E402
                            pose_yaml, random_pose, read_uploaded_pose, tidy)

log = logging.getLogger("deephandmesh")
DEFAULT_POSE = "open"
PRESET_ORDER = ("original", "open", "fist", "point", "ok")
# The hand's own frame (x wrist → fingers, y out of the palm, z towards the thumb) in the page's
# world (z up): fingers up, the palm towards the camera at -y, the thumb on the viewer's right,
# as in render.png's palm view. Columns are the hand's axes.
HAND_TO_WORLD = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
MM = 1e-3  # the page works in metres (viser's camera and grid defaults); files stay in mm
SKIN_RGB = (215, 170, 135)
SLIDER_STEP = 0.1


class EditorError(DeepHandMeshError, RuntimeError):
    """The editor cannot start (e.g. the port is taken); the message says what to do."""


def check_port(host: str, port: int) -> None:
    """Fail with a clear message when ``host:port`` cannot be listened on (viser would quietly take
    the next free port instead)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise EditorError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise EditorError(f"--port {port}: {host}:{port} is taken ({err.strerror}); stop what is using it "
                              f"or give another port, e.g. --port {port + 1}") from None


def dof_label(model, joint: int, axis: int) -> str:
    short = model.joint_names[joint].split("_", 2)[-1] if model.joint_names[joint].count("_") >= 2 \
        else model.joint_names[joint]
    return f"{short} {AXIS_NAMES[axis]}"


@dataclass
class Keyframes:
    poses: List[np.ndarray] = field(default_factory=list)


class Editor:
    """The model, the web server, and one :class:`Session` per browser tab."""

    def __init__(self, args):
        import viser

        self.args = args
        check_port(args.host, args.port)
        self.hand, self.model, self.device, self.ckpt_text = load_model(args)
        self.start_deg = pose_degrees(self.hand, args.pose)
        with torch.no_grad():  # the pose-independent part of the decoder, once for every decode
            self.identity = self.model.identity()
        self.model_lock = threading.Lock()  # one decode at a time: the browser tabs share the model
        self.sessions: Dict[int, Session] = {}
        self.server = viser.ViserServer(host=args.host, port=args.port, label="DeepHandMesh pose editor",
                                        verbose=False)
        if args.port and self.server.get_port() != args.port:  # lost a race for the port
            self.server.stop()
            raise EditorError(f"--port {args.port}: {args.host}:{args.port} is taken; give another port")
        self.port = self.server.get_port()
        # viser's share button would open a tunnel through a server on the internet: not offered.
        self.server.gui.configure_theme(show_share_button=False)
        self._frame_camera()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(lambda client: self.sessions.pop(client.client_id, None))

    @property
    def url(self) -> str:
        host = "localhost" if self.args.host in ("0.0.0.0", "::") else self.args.host
        return f"http://{host}:{self.port}"

    def decode(self, euler_deg: np.ndarray):
        """``[J, 3]`` degrees → ``(joints [J, 3], vertices [V, 3])`` mm, as ``demo.py``."""
        with self.model_lock:
            joints, verts = decode_pose(self.model, euler_tensor(euler_deg), self.device, self.identity)
        return joints[0], verts[0]

    def to_world(self, points_mm: np.ndarray) -> np.ndarray:
        return (np.asarray(points_mm) * MM) @ HAND_TO_WORLD.T

    def _frame_camera(self) -> None:
        """The camera frames the start pose: in front of the palm, a little above, the whole hand in view."""
        _, verts = self.decode(self.start_deg)
        world = self.to_world(verts)
        lo, hi = world.min(0), world.max(0)
        centre = (lo + hi) / 2
        radius = float(np.linalg.norm(hi - lo)) / 2
        fov = np.radians(50.0)
        distance = 1.15 * radius / np.tan(fov / 2)
        view = np.array([0.25, -1.0, 0.3]) / np.linalg.norm([0.25, -1.0, 0.3])
        self.ground = float(lo[2]) - 0.01
        self.centre, self.view_dir = centre, view
        camera = self.server.initial_camera
        camera.fov = float(fov)
        camera.look_at = tuple(centre)
        camera.position = tuple(centre + distance * view)
        camera.up = (0.0, 0.0, 1.0)

    def _connect(self, client) -> None:
        self.sessions[client.client_id] = Session(self, client)

    def stop(self) -> None:
        self.server.stop()


class Session:
    """One browser tab: its own pose, sliders, scene and keyframes."""

    def __init__(self, editor: Editor, client):
        self.editor, self.client, self.hand = editor, client, editor.hand
        self.lock = threading.RLock()
        self.deg = editor.start_deg.copy()
        self.lifted = bool(limit_violations(self.hand, self.deg, joint_limits_deg(self.hand)))
        self.keyframes = Keyframes()
        self.rng = np.random.default_rng()
        # While this session sets its own sliders from the pose, the callbacks that viser runs for
        # those assignments (in the assigning thread) do nothing. Per thread: a change the user makes
        # meanwhile arrives on one of viser's pool threads, waits for the lock and is applied.
        self._own = threading.local()
        self.update_ms: deque = deque(maxlen=1000)  # server side of each update: decode + send
        self.verts = self.joints = None
        self._build_scene()
        self._build_gui()
        self._on_lighting()
        self.refresh()
        if self.lifted:
            self.say(f"The start pose goes beyond the joint limits "
                     f"({'; '.join(limit_violations(self.hand, self.deg, joint_limits_deg(self.hand)))}): "
                     "limits lifted.")

    # ---------------------------------------------------------------- state
    def limits(self) -> np.ndarray:
        return joint_limits_deg(self.hand, lifted=self.lifted)

    def set_pose(self, euler_deg: np.ndarray, what: str) -> None:
        """Show a whole new pose (preset, file, random…); lifts the limits when it lies beyond them."""
        with self.lock:
            euler_deg = tidy(euler_deg, self.hand, decimals=None)  # a file's angles to the last digit
            beyond = limit_violations(self.hand, euler_deg, joint_limits_deg(self.hand))
            if beyond and not self.lifted:
                self.lifted = True
                self.say(f"{what}: beyond the joint limits ({'; '.join(beyond)}): limits lifted.")
            else:
                self.say(f"{what}.")
            self.deg = euler_deg
            self._sync_sliders()
            self.refresh()

    def set_angle(self, joint: int, axis: int, value: float) -> None:
        with self.lock:
            deg = self.deg.copy()
            deg[joint, axis] = value
            self.deg = clamp(tidy(deg, self.hand), self.limits())
            if abs(self.deg[joint, axis] - value) > 1e-3:  # typed beyond the range: show the value used
                self._sync_sliders()
            self.refresh()

    def refresh(self) -> None:
        """Decode the pose and update the mesh (and the skeleton and labels where shown) in the page."""
        start = time.perf_counter()
        self.joints, self.verts = self.editor.decode(self.deg)
        with self.client.atomic():
            self.mesh.vertices = self.editor.to_world(self.verts).astype(np.float32)
            if self.gui_skeleton.value:
                self._update_skeleton()
            if self.gui_names.value:
                self._update_labels()
        self.client.flush()
        self.update_ms.append((time.perf_counter() - start) * 1e3)

    # ---------------------------------------------------------------- scene
    def _build_scene(self) -> None:
        scene, hand, editor = self.client.scene, self.hand, self.editor
        _, verts = editor.decode(self.deg)
        self.mesh = scene.add_mesh_simple("/hand", editor.to_world(verts).astype(np.float32),
                                          hand.faces.astype(np.uint32), color=SKIN_RGB)
        self.bone_pairs = np.array([(j, p) for j, p in enumerate(hand.parents) if p >= 0])
        self.bones = scene.add_line_segments("/skeleton/bones", np.zeros((len(self.bone_pairs), 2, 3), np.float32),
                                             (60, 160, 40), thickness=3.0, thickness_units="screen", visible=False)
        self.joint_dots = scene.add_point_cloud("/skeleton/joints", np.zeros((hand.joint_num, 3), np.float32),
                                                (200, 30, 30), point_size=0.0035, point_shape="circle",
                                                precision="float32", visible=False)
        self.labels = [scene.add_label(f"/labels/{name}", name.split("_", 2)[-1], visible=False,
                                       font_screen_scale=0.8, depth_test=False)
                       for name in hand.joint_names]
        # Lights for the plain drawing (no shadows, no environment map), which a browser without a GPU
        # draws several times faster; off while the default lights and reflections are used.
        self.plain_lights = [scene.add_light_ambient("/lights/ambient", intensity=0.9, visible=False),
                             scene.add_light_directional("/lights/front", intensity=1.8, visible=False,
                                                         position=tuple(editor.centre + editor.view_dir))]
        centre = editor.centre
        self.grid = scene.add_grid("/grid", width=0.4, height=0.4, plane="xy", cell_size=0.01, section_size=0.05,
                                   position=(float(centre[0]), float(centre[1]), editor.ground), visible=True)

    def _update_skeleton(self) -> None:
        world = self.editor.to_world(self.joints).astype(np.float32)
        self.bones.points = world[self.bone_pairs]
        self.joint_dots.points = world

    def _update_labels(self) -> None:
        world = self.editor.to_world(self.joints)
        for label, p in zip(self.labels, world):
            label.position = tuple(float(c) for c in p)

    # ---------------------------------------------------------------- gui
    def _build_gui(self) -> None:
        gui, hand = self.client.gui, self.hand
        self.info = gui.add_markdown(self._info_text())
        self.status = gui.add_markdown("")

        with gui.add_folder("Pose"):
            presets = [p for p in PRESET_ORDER if p in preset_names()]
            presets += [p for p in preset_names() if p not in presets]
            group = gui.add_button_group("Preset", presets)
            group.on_click(lambda event: self._guarded(
                lambda: self.set_pose(pose_degrees(hand, event.target.value), f"preset '{event.target.value}'")))
            reset = gui.add_button("Reset (every angle 0)", hint="the rest pose: a flat, open hand")
            reset.on_click(lambda _: self.set_pose(np.zeros_like(self.deg), "reset: every angle 0"))
            rand = gui.add_button("Random pose within the limits")
            rand.on_click(lambda _: self.set_pose(random_pose(hand, joint_limits_deg(hand), self.rng),
                                                  "random pose within the limits"))
            self.gui_lift = gui.add_checkbox("Lift the joint limits", initial_value=self.lifted,
                                             hint="every angle from -180° to 180° (see common/hand/joint_limits.py)")
            self.gui_lift.on_update(lambda _: self._on_lift())

        self.sliders: Dict[tuple, object] = {}
        limits = self.limits()
        for finger, dofs in angle_dofs(hand).items():
            if not dofs:
                continue
            with gui.add_folder(finger.capitalize(), expand_by_default=finger == "index"):
                for j, k in dofs:
                    lo, hi = limits[j, k]
                    slider = gui.add_slider(dof_label(hand, j, k), float(lo), float(hi), SLIDER_STEP,
                                            float(self.deg[j, k]),
                                            hint=f"{hand.joint_names[j]}, {'xyz'[k]} axis, degrees")
                    slider.on_update(self._slider_callback(j, k))
                    self.sliders[(j, k)] = slider
                if finger != "thumb":
                    copy = gui.add_button(f"Copy the {finger}'s angles to the other fingers")
                    copy.on_click(lambda _, f=finger: self.set_pose(copy_finger(hand, self.deg, f),
                                                                    f"{f}'s angles copied to the other fingers"))

        with gui.add_folder("Display"):
            self.gui_skeleton = gui.add_checkbox("Skeleton (bones and joints)", initial_value=False)
            self.gui_skeleton.on_update(lambda _: self._on_display())
            self.gui_names = gui.add_checkbox("Joint names", initial_value=False)
            self.gui_names.on_update(lambda _: self._on_display())
            self.gui_wire = gui.add_checkbox("Wireframe", initial_value=False)
            self.gui_wire.on_update(lambda _: setattr(self.mesh, "wireframe", self.gui_wire.value))
            self.gui_grid = gui.add_checkbox("Ground grid", initial_value=True)
            self.gui_grid.on_update(lambda _: setattr(self.grid, "visible", self.gui_grid.value))
            # Off at first: a browser on a machine without a GPU (as this project's) draws the plain
            # scene about twice as fast, which keeps a slider's round trip short.
            self.gui_fancy = gui.add_checkbox("Shadows and reflections", initial_value=False,
                                              hint="nicer, and slower to draw in a browser without a GPU")
            self.gui_fancy.on_update(lambda _: self._on_lighting())

        with gui.add_folder("Save and load"):
            gui.add_button("Save the pose (YAML)", hint="the file demo.py --pose reads").on_click(
                lambda _: self._guarded(self.save_pose))
            gui.add_button("Save the mesh (OBJ)", hint="as demo.py writes mesh.obj (mm)").on_click(
                lambda _: self._guarded(self.save_mesh))
            gui.add_button("Save render.png", hint="the demo's picture: palm, side and back").on_click(
                lambda _: self._guarded(self.save_render))
            gui.add_button("Save the rigged hand (.glb)",
                           hint="glTF for Blender, game engines, web pages: skeleton posed, skin, pose corrective "
                                "(as demo/export.py --pose)").on_click(lambda _: self._guarded(self.save_glb))
            upload = gui.add_upload_button("Load a pose file", mime_type="*/*",
                                           hint="YAML or JSON {joint: [x, y, z]} in degrees, as demo.py --pose")
            upload.on_upload(lambda event: self.load_file(event.target.value.name, event.target.value.content))

        with gui.add_folder("Animation", expand_by_default=False):
            self.gui_keys = gui.add_markdown("No keyframes yet.")
            gui.add_button("Record keyframe", hint="adds the pose as it is now").on_click(
                lambda _: self.record_keyframe())
            gui.add_button("Clear keyframes").on_click(lambda _: self.clear_keyframes())
            self.gui_seconds = gui.add_number("Seconds per pose", 1.0, min=0.05, max=60.0, step=0.05)
            self.gui_fps = gui.add_number("Frames per second", 20.0, min=1.0, max=60.0, step=1.0)
            self.gui_format = gui.add_dropdown("Format", ("GIF", "MP4"), initial_value="GIF")
            self.gui_views = gui.add_dropdown("Panels", ("palm, side, back", "palm"), initial_value="palm, side, back")
            gui.add_button("Download animation").on_click(lambda _: self._guarded(self.download_animation))
            gui.add_button("Download the rigged animation (.glb)",
                           hint="glTF: the keyframes as a skeletal animation, seconds per pose apart "
                                "(as demo/export.py --poses)").on_click(lambda _: self._guarded(self.download_glb))
            self.progress = gui.add_progress_bar(0.0, visible=False)

    def _info_text(self) -> str:
        editor, hand = self.editor, self.hand
        ckpt = ("no checkpoint: correctives are zero" if editor.ckpt_text.startswith("no checkpoint")
                else editor.ckpt_text)
        return (f"**Hand model:** {hand.source}  \n**Mesh:** {hand.vertex_num} vertices, {hand.joint_num} joints, "
                f"{hand.dof_num} degrees of freedom  \n**Checkpoint:** {ckpt}  \n**Device:** {editor.device}  \n"
                "Each browser tab has its own pose. Angles in degrees: flexion (z) curls towards the palm, "
                "spread (y) moves a bone sideways, twist (x) turns it about itself.")

    def say(self, text: str, error: bool = False) -> None:
        # HTML, escaped: messages hold names like b_r_index1 that markdown would turn into italics
        style = " style='color:#c00'" if error else ""
        self.status.content = f"<b{style}>{html.escape(text)}</b>"
        if error:
            self.client.add_notification("Not done", text, color="red", auto_close_seconds=10.0)

    def _guarded(self, action) -> None:
        """Run a button's action; a bad input shows the demo's one-line message and keeps the pose.
        A bug shows its traceback on the console (and says so in the page)."""
        try:
            action()
        except DeepHandMeshError as err:
            self.say(f"error: {one_line(err)}", error=True)
        except Exception as err:  # noqa: BLE001 - a bug: its traceback where the developer looks
            log.exception("pose editor: a bug in a button's action")
            self.say(f"internal error ({type(err).__name__}; its traceback is on the editor's console)", error=True)

    def muted(self) -> bool:
        return getattr(self._own, "muted", False)

    def _slider_callback(self, joint: int, axis: int):
        def callback(event) -> None:
            if not self.muted():
                self.set_angle(joint, axis, float(event.target.value))
        return callback

    def _sync_sliders(self) -> None:
        """Put the pose and the ranges into the sliders without re-decoding for each one."""
        limits = self.limits()
        self._own.muted = True
        try:
            with self.client.atomic():
                for (j, k), slider in self.sliders.items():
                    slider.min, slider.max = float(limits[j, k, 0]), float(limits[j, k, 1])
                    slider.value = float(self.deg[j, k])
                self.gui_lift.value = self.lifted
        finally:
            self._own.muted = False

    def _on_lift(self) -> None:
        if self.muted():
            return
        with self.lock:
            self.lifted = bool(self.gui_lift.value)
            clamped = [] if self.lifted else limit_violations(self.hand, self.deg, self.limits())
            self.deg = clamp(self.deg, self.limits())
            self._sync_sliders()
            self.refresh()
            self.say("joint limits lifted: every angle from -180° to 180°" if self.lifted else
                     "joint limits on" + (f"; brought back within them: {'; '.join(clamped)}" if clamped else ""))

    def _on_display(self) -> None:
        with self.lock:
            self.refresh()  # positions first, so that nothing shows where it was the last time
            for handle in (self.bones, self.joint_dots):
                handle.visible = self.gui_skeleton.value
            # the skeleton lies inside the skin: see through it while the skeleton is shown
            self.mesh.opacity = 0.45 if self.gui_skeleton.value else None
            for label in self.labels:
                label.visible = self.gui_names.value

    def _on_lighting(self) -> None:
        fancy = bool(self.gui_fancy.value)
        scene = self.client.scene
        with self.client.atomic():
            if fancy:
                scene.configure_environment_map()
            else:
                scene.configure_environment_map(hdri=None)
            scene.configure_default_lights(enabled=fancy, cast_shadow=fancy)
            self.mesh.cast_shadow = self.mesh.receive_shadow = fancy
            for light in self.plain_lights:
                light.visible = not fancy

    # ---------------------------------------------------------------- files
    def pose_text(self) -> str:
        return pose_yaml(self.hand, self.deg, comment=f"DeepHandMesh pose editor; hand model: {self.hand.source}\n"
                                                      "Reproduce the mesh: python demo/demo.py --pose THIS_FILE")

    def save_pose(self) -> None:
        self._send("pose.yaml", self.pose_text().encode("utf-8"))
        self.say("pose saved as pose.yaml")

    def _send(self, name: str, data: bytes) -> None:
        """The browser saves ``data`` as ``name`` (its usual download)."""
        self.client.send_file_download(name, data, save_immediately=True)

    def _file_bytes(self, name: str, write) -> bytes:
        with tempfile.TemporaryDirectory(prefix="editor_") as folder:
            path = Path(folder) / name
            write(path)
            return path.read_bytes()

    def save_mesh(self) -> None:
        with self.lock:
            verts = self.verts.copy()
        self._send("mesh.obj", self._file_bytes("mesh.obj", lambda p: save_obj(p, verts, self.hand)))
        self.say("mesh saved as mesh.obj")

    def save_render(self) -> None:
        with self.lock:
            verts, joints = self.verts.copy(), self.joints.copy()
        image = render_pose(self.hand, verts, joints)
        self._send("render.png", self._file_bytes("render.png", lambda p: save_image(p, image)))
        self.say("picture saved as render.png")

    def glb_extras(self, what: str) -> dict:
        return export.file_extras(self.hand, self.editor.ckpt_text, f"pose editor: {what}")

    def save_glb(self) -> None:
        """The current pose as ``demo/export.py --pose`` writes it (the same decode input)."""
        with self.lock:
            deg = self.deg.copy()
        request = export.pose_request_degrees(deg, "the editor's pose")
        with self.editor.model_lock:
            data = export.request_glb(self.editor.model, request, self.glb_extras(request.what))
        self._send("hand.glb", data)
        self.say("rigged hand saved as hand.glb")

    def load_file(self, name: str, content: bytes) -> None:
        notes: List[str] = []
        try:
            deg = read_uploaded_pose(self.hand, name, content, notes)
        except PoseError as err:
            self.say(f"error: {err}", error=True)
            return
        self.set_pose(deg, f"pose file {Path(name).name} loaded")
        if notes:  # after set_pose's own message, so that it stays in view
            self.say(f"pose file {Path(name).name} loaded; warning: {'; '.join(notes)}")

    # ---------------------------------------------------------------- animation
    def record_keyframe(self) -> None:
        with self.lock:
            self.keyframes.poses.append(self.deg.copy())
            count = len(self.keyframes.poses)
        self.gui_keys.content = f"{count} keyframe{'s' if count != 1 else ''} recorded."
        self.say(f"keyframe {count} recorded")

    def clear_keyframes(self) -> None:
        self.keyframes.poses.clear()
        self.gui_keys.content = "No keyframes yet."
        self.say("keyframes cleared")

    def animation_bytes(self, on_frame=None) -> tuple:
        """``(file name, bytes)`` of the recorded keyframes' animation, made by :mod:`demo.animate`."""
        poses = list(self.keyframes.poses)
        if len(poses) < 2:
            raise EditorError("record at least two keyframes first (the animation moves from one to the next)")
        suffix = ".gif" if self.gui_format.value == "GIF" else ".mp4"
        views = ("palm",) if self.gui_views.value == "palm" else animate.DEFAULT_VIEWS
        size = 256
        animate.check_format(Path("animation" + suffix), size, len(views))
        fps = float(self.gui_fps.value)
        fpp = animate.frames_per_pose(float(self.gui_seconds.value), fps)
        frames = animate.render_frames(self.hand, self.editor.model, self.editor.device, np.stack(poses), fpp,
                                       views=views, image_size=size, progress=False, on_frame=on_frame,
                                       lock=self.editor.model_lock)
        return "animation" + suffix, animate.encode_animation(frames, fps, suffix)

    def glb_animation_bytes(self) -> bytes:
        """The recorded keyframes as a rigged ``.glb`` animation (``demo/export.py --poses``)."""
        poses = list(self.keyframes.poses)
        if len(poses) < 2:
            raise ValueError("record at least two keyframes first (the animation moves from one to the next)")
        request = export.keyframes_request(np.stack(poses), float(self.gui_seconds.value),
                                           [f"keyframe {k + 1}" for k in range(len(poses))])
        with self.editor.model_lock:
            return export.request_glb(self.editor.model, request, self.glb_extras(request.what))

    def download_glb(self) -> None:
        self._send("animation.glb", self.glb_animation_bytes())
        self.say(f"rigged animation of {len(self.keyframes.poses)} keyframes saved as animation.glb")

    def download_animation(self) -> None:
        self.progress.visible = True

        def on_frame(done: int, total: int) -> None:
            self.progress.value = 100.0 * done / total

        try:
            name, data = self.animation_bytes(on_frame)
        finally:
            self.progress.visible = False
        self._send(name, data)
        self.say(f"animation of {len(self.keyframes.poses)} keyframes saved as {name}")


def parse_args(argv=None):
    pose_help = f"start pose: a YAML/JSON file or a preset ({', '.join(preset_names())}); default {DEFAULT_POSE}"
    parser = model_and_pose_parser(__doc__, DEFAULT_POSE, pose_help)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 0..65535")
    return args


def main(argv=None) -> int:
    return script_main(serve, parse_args, argv)


def serve(args) -> None:
    """Start the editor and serve until Ctrl+C."""
    editor = Editor(args)
    print(f"hand model: {editor.hand.source} ({editor.hand.vertex_num} vertices, {editor.hand.joint_num} joints)")
    print(editor.ckpt_text)
    print(f"pose editor: open {editor.url} in a browser (Ctrl+C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        editor.stop()


if __name__ == "__main__":
    sys.exit(main())
