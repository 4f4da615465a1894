"""``bench.py data``: the project's sample reader against the original's, side by side on one thread,
and the ``DataLoader`` with persistent workers (rate and each worker's peak memory).

The side-by-side part reads the same samples of one data set with :class:`OriginalReader` (the
yardstick below) and with :class:`data.dataset.DeepHandMeshDataset` (training mode), in one
process with one torch and one OpenCV thread. Runs alternate (A B, then B A, ...) and the medians
are reported, so that a machine whose speed drifts (other jobs) affects both alike. Each run is
timed by the wall clock and by the thread's CPU time; the latter hardly moves when other jobs share
the cores.
"""
from __future__ import annotations

import cProfile
import io
import pickle
import pstats
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from data.dataset import DeepHandMeshDataset, pts_to_model_index, read_pts_raw


# ============================================================================================
# YARDSTICK: the original's reading and warping, for timing only. A transcription (in our own
# words) of facebookresearch/DeepHandMesh ``data/dataset.py`` (``Dataset.__getitem__`` and the
# keypoints its ``__init__`` reads) and ``common/utils/preprocessing.py`` (``load_img``,
# ``get_bbox``, ``generate_patch_image``, ``gen_trans_from_patch_cv``) with
# ``torchvision.transforms.ToTensor`` as its transform. It calls plain ``pickle.load`` on the depth
# maps, which is safe here only because the benchmark reads files it was given to measure; the
# project's reader never does (common/io/safe_pickle.py).
# ============================================================================================
def yardstick_load_img(path: str) -> np.ndarray:
    """``load_img``: OpenCV decodes (colour, EXIF orientation ignored), BGR -> RGB copy, float32."""
    img = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if not isinstance(img, np.ndarray):
        raise IOError(f"could not read {path}")
    return img[:, :, ::-1].copy().astype(np.float32)


def yardstick_get_bbox(joint_world, joint_valid, camrot, campos, focal, princpt) -> np.ndarray:
    """``get_bbox``: every joint to the camera one at a time, to pixels (+1e-8 in the division), the
    valid ones' extent enlarged 1.5x about its centre, float32."""
    joint_cam = np.array([np.dot(camrot, joint_world[i] - campos) for i in range(len(joint_world))]).reshape(-1, 3)
    x = joint_cam[..., 0] / (joint_cam[..., 2] + 1e-8) * focal[0] + princpt[0]
    y = joint_cam[..., 1] / (joint_cam[..., 2] + 1e-8) * focal[1] + princpt[1]
    keep = joint_valid[:, 0] == 1
    x, y = x[keep], y[keep]
    xmin, ymin, xmax, ymax = min(x), min(y), max(x), max(y)
    xc, width = (xmin + xmax) / 2., xmax - xmin
    yc, height = (ymin + ymax) / 2., ymax - ymin
    return np.array([xc - 0.5 * width * 1.5, yc - 0.5 * height * 1.5,
                     xc + 0.5 * width * 1.5, yc + 0.5 * height * 1.5]).astype(np.float32)


def yardstick_trans(c_x, c_y, src_w, src_h, dst_w, dst_h) -> np.ndarray:
    """``gen_trans_from_patch_cv`` with scale 1 and no rotation: three float32 point pairs."""
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = np.array([c_x, c_y], dtype=np.float32)
    src[1] = src[0] + np.array([0, src_h * 0.5], dtype=np.float32)
    src[2] = src[0] + np.array([src_w * 0.5, 0], dtype=np.float32)
    dst[0] = np.array([dst_w * 0.5, dst_h * 0.5], dtype=np.float32)
    dst[1] = dst[0] + np.array([0, dst_h * 0.5], dtype=np.float32)
    dst[2] = dst[0] + np.array([dst_w * 0.5, 0], dtype=np.float32)
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def yardstick_patch(cvimg: np.ndarray, bbox, out_shape) -> np.ndarray:
    """``generate_patch_image`` without flip, scale or rotation: a copy, then a bilinear warp of the
    ``[x, y, w, h]`` box onto ``out_shape``, float32."""
    img = cvimg.copy()
    c_x, c_y = float(bbox[0] + 0.5 * bbox[2]), float(bbox[1] + 0.5 * bbox[3])
    trans = yardstick_trans(c_x, c_y, float(bbox[2]), float(bbox[3]), out_shape[1], out_shape[0])
    patch = cv2.warpAffine(img, trans, (int(out_shape[1]), int(out_shape[0])), flags=cv2.INTER_LINEAR)
    return patch.astype(np.float32)


class OriginalReader:
    """The original's ``Dataset`` over the files of a :class:`DeepHandMeshDataset` (same samples,
    cameras and paths): keypoints read once, as its ``__init__`` does, and ``__getitem__`` reading
    and warping the image and ``render_view_num`` random depth maps."""

    def __init__(self, dataset: DeepHandMeshDataset):
        import torchvision.transforms

        self.transform = torchvision.transforms.ToTensor()
        self.original_img_shape = dataset.original_img_shape
        self.input_img_shape = dataset.input_img_shape
        self.rendered_img_shape = dataset.rendered_img_shape
        self.render_view_num = dataset.render_view_num
        self.cameras = list(dataset.cameras)
        self.cam = {name: {"camrot": dataset.camrot[i], "campos": dataset.campos[i], "focal": dataset.focal[i],
                           "princpt": dataset.princpt[i]} for i, name in enumerate(self.cameras)}
        index = pts_to_model_index(dataset.joint_names)
        joints = {}
        self.framelist = []
        for i, (_seq, cam, frame) in enumerate(dataset.samples):
            if frame not in joints:  # the original's load_joint_coord: ones where a joint is missing
                world = np.ones((len(dataset.joint_names), 3), dtype=np.float32)
                valid = np.zeros((len(dataset.joint_names), 1), dtype=np.float32)
                for k, (xyz, _score, _views) in read_pts_raw(dataset.keypoint_path(frame)).items():
                    if k < len(index):
                        world[index[k]] = np.array(xyz, dtype=np.float32)
                        valid[index[k]] = 1
                joints[frame] = (world, valid)
            self.framelist.append({"cam": cam, "frame": frame, "img_path": str(dataset.image_path(i)),
                                   "joint": joints[frame],
                                   "depth_paths": {c: str(dataset.depthmap_path(frame, c)) for c in self.cameras}})

    def __len__(self) -> int:
        return len(self.framelist)

    def box(self, joint, cam: str) -> np.ndarray:
        """The clipped box of ``__getitem__`` (Python max/min on the float32 corners)."""
        c = self.cam[cam]
        xmin, ymin, xmax, ymax = yardstick_get_bbox(joint[0], joint[1], c["camrot"], c["campos"], c["focal"],
                                                    c["princpt"])
        H, W = self.original_img_shape
        return np.array([max(xmin, 0), max(ymin, 0), min(xmax, W - 1), min(ymax, H - 1)])

    def __getitem__(self, idx: int):
        frame = self.framelist[idx]
        H, W = self.original_img_shape
        xmin, ymin, xmax, ymax = self.box(frame["joint"], frame["cam"])
        img = yardstick_load_img(frame["img_path"])
        xmin, xmax = np.array([xmin, xmax]) / W * img.shape[1]
        ymin, ymax = np.array([ymin, ymax]) / H * img.shape[0]
        img = yardstick_patch(img, np.array([xmin, ymin, xmax - xmin + 1, ymax - ymin + 1]), self.input_img_shape)
        input_img = self.transform(img) / 255.

        depthmaps, cam_params, affines = [], [], []
        for cam in random.sample(self.cameras, self.render_view_num):
            bbox = self.box(frame["joint"], cam)
            with open(frame["depth_paths"][cam], "rb") as f:
                depthmap = pickle.load(f).astype(np.float32)  # yardstick only (see above)
            xmin, ymin, xmax, ymax = bbox
            xmin, xmax = np.array([xmin, xmax]) / W * depthmap.shape[1]
            ymin, ymax = np.array([ymin, ymax]) / H * depthmap.shape[0]
            depthmap = yardstick_patch(depthmap[:, :, None], np.array([xmin, ymin, xmax - xmin + 1, ymax - ymin + 1]),
                                       self.rendered_img_shape)
            depthmaps.append(self.transform(depthmap))
            xmin, ymin, xmax, ymax = bbox
            affines.append(yardstick_trans((xmin + xmax + 1) / 2., (ymin + ymax + 1) / 2., xmax - xmin + 1,
                                           ymax - ymin + 1, self.rendered_img_shape[1],
                                           self.rendered_img_shape[0]).astype(np.float32))
            cam_params.append(self.cam[cam])
        return ({"img": input_img}, {"depthmap": depthmaps, "joint": frame["joint"]},
                {"cam_param": cam_params, "affine_trans": affines})
# ====================================================================== end of the yardstick


# ------------------------------------------------------------------------------ side by side
def time_reads(read: Callable[[int], object], indices: Sequence[int]) -> Tuple[float, float]:
    """Wall and thread-CPU seconds of reading ``indices`` one after the other."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in indices:
        read(i)
    return time.perf_counter() - wall, time.thread_time() - cpu


READERS = (("original", "original (yardstick)"),
           ("first", "ours, a worker's 1st epoch"),
           ("later", "ours, later epochs"))


def side_by_side(ours: DeepHandMeshDataset, theirs: OriginalReader, samples: int, rounds: int,
                 seed: int = 0) -> Dict[str, Dict[str, List[float]]]:
    """Samples/s of the readers of :data:`READERS` over ``rounds`` runs of ``samples`` samples each
    (the same indices for all, each at most once, a fresh random choice every round; the order of
    the readers rotates from round to round). ``first``: a fresh copy of ``ours`` every round, which
    works out each frame's keypoints and crop boxes on the way, as a ``DataLoader`` worker does in
    its first epoch; ``later``: ``ours`` itself, which keeps them (warmed up beforehand).
    Returns ``{name: {'wall': [...], 'cpu': [...]}}``."""
    rng = np.random.default_rng(seed)
    rates: Dict[str, Dict[str, List[float]]] = {name: {"wall": [], "cpu": []} for name, _ in READERS}
    n = len(ours)
    for r in range(rounds):
        indices = rng.choice(n, size=samples, replace=samples > n).tolist()
        fresh = pickle.loads(pickle.dumps(ours))  # a new reader: nothing of the frames kept
        readers = {"original": theirs.__getitem__, "first": fresh.__getitem__, "later": ours.__getitem__}
        names = [name for name, _ in READERS]
        for name in names[r % 3:] + names[:r % 3]:
            wall, cpu = time_reads(readers[name], indices)
            rates[name]["wall"].append(samples / wall)
            rates[name]["cpu"].append(samples / max(cpu, 1e-9))
    return rates


def profile_reads(read: Callable[[int], object], indices: Sequence[int], top: int = 12) -> str:
    """cProfile's table of the functions that took most of the time (own time), for one pass."""
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for i in indices:
        read(i)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((k for k, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(line for line in lines[start:] if line.strip())


# ------------------------------------------------------------------------------ loader workers
def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (``VmHWM``), MB; ``ru_maxrss`` where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # (Unix)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerMemory(torch.utils.data.Dataset):
    """A data set whose samples also carry the reading worker's id and peak RSS (MB)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        sample = self.dataset[idx]
        info = torch.utils.data.get_worker_info()
        sample["worker"] = -1 if info is None else info.id
        sample["worker_peak_rss_mb"] = peak_rss_mb()
        return sample


def loader_epochs(dataset: DeepHandMeshDataset, workers: int, batch: int, epochs: int):
    """Samples/s of each of ``epochs`` passes of a ``DataLoader`` with persistent workers (as training
    uses it) and each worker's peak RSS (MB) over all of them."""
    loader = torch.utils.data.DataLoader(WorkerMemory(dataset), batch_size=batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    rates, peaks = [], {}
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for item in loader:
            count += item["img"].shape[0]
            for w, mb in zip(item["worker"].tolist(), item["worker_peak_rss_mb"].tolist()):
                peaks[w] = max(peaks.get(w, 0.0), mb)
        rates.append(count / (time.perf_counter() - start))
    del loader  # ends the workers
    return rates, peaks


# ------------------------------------------------------------------------------------ the run
def run(args) -> None:
    from common.hand.hand_model import is_hand_model_folder, load_hand_model
    from common.hand.hand_model_source import resolve_hand_model
    from tools.benchmarks.timing import machine_description

    data = Path(args.data)
    hand_dir = data / "hand_model"
    hand = load_hand_model(hand_dir) if is_hand_model_folder(hand_dir) else resolve_hand_model()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    dataset = DeepHandMeshDataset(data, mode="train", joint_names=hand.joint_names,
                                  input_img_shape=(args.size, args.size), rendered_img_shape=(args.size, args.size),
                                  render_view_num=args.views, seed=0)  # seeded, as training reads it
    original = OriginalReader(dataset)
    first = dataset.depthmap_path(dataset.samples[0][2], dataset.cameras[0]).read_bytes()
    depth_shape = pickle.loads(first).shape  # a file this benchmark was given to read
    protocol = first[1] if first[:1] == b"\x80" else "0/1"
    image_shape = cv2.imread(str(dataset.image_path(0))).shape[:2]
    samples = args.samples or len(dataset)
    print(f"data reader: {machine_description()}")
    print(f"{len(dataset)} samples in {data} (images {image_shape[0]}x{image_shape[1]}, depth maps "
          f"{depth_shape[0]}x{depth_shape[1]}, pickle protocol {protocol}), training mode, "
          f"input {args.size}x{args.size}, {args.views} depth maps of {args.size}x{args.size}; one process, "
          f"1 torch / 1 OpenCV thread; {args.rounds} alternating runs of {samples} samples each, medians")
    for i in range(len(dataset)):  # warm-up: caches, lazy imports; the frames' keypoints and boxes
        dataset[i]
        original[i]
    rates = side_by_side(dataset, original, samples, args.rounds)
    print(f"{'reader':<30} {'samples/s (wall)':>16} {'samples/s (CPU)':>16} {'/ original (wall, CPU)':>24}")
    for name, label in READERS:
        ratios = [statistics.median(o / t for o, t in zip(rates[name][clock], rates["original"][clock]))
                  for clock in ("wall", "cpu")]
        shown = "" if name == "original" else f"{ratios[0]:>11.2f}x {ratios[1]:>10.2f}x"
        print(f"{label:<30} {statistics.median(rates[name]['wall']):>16.1f} "
              f"{statistics.median(rates[name]['cpu']):>16.1f} {shown:>24}")
    print("(medians over the runs; the ratios are medians of the per-run ratios)")
    if args.profile:
        indices = list(range(min(samples, len(dataset))))
        for label, read in (("original (yardstick)", original.__getitem__), ("ours, later epochs", dataset.__getitem__)):
            print(f"\nwhere the time goes, {label}, {len(indices)} samples (thread CPU time, cProfile):")
            print(profile_reads(read, indices))
    if args.workers > 0:
        parent = peak_rss_mb()
        # A copy keeps nothing of the frames: the workers start as training's do.
        rates, peaks = loader_epochs(pickle.loads(pickle.dumps(dataset)), args.workers, args.batch, args.repeats + 1)
        print(f"\nDataLoader: batch {args.batch}, {args.workers} persistent worker(s) (one thread each), "
              f"{args.repeats + 1} epochs")
        later = "epoch 2" if len(rates) == 2 else f"median of epochs 2-{len(rates)}"
        print(f"samples/s: {statistics.median(rates[1:]):.1f} ({later}; epoch 1, with the workers' start-up: "
              f"{rates[0]:.1f})")
        shown = ", ".join(f"worker {w}: {mb:.0f} MB" for w, mb in sorted(peaks.items()))
        print(f"peak RSS of each loader worker (VmHWM, counts the pages shared with the main process): {shown}; "
              f"main process before the workers started: {parent:.0f} MB")
