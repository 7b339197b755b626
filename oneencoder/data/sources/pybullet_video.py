"""Real-physics video clips: pybullet objects that drop, bounce, roll, slide, spin or topple.

Every clip is a scripted action of one :data:`~.pybullet_scenes.CATALOG` object on the floor,
simulated by pybullet (``DIRECT``, 240 Hz) for 2 s. Sixteen frames, one every 30 physics steps
(8 fps), are rendered at 224 px with a fixed camera that frames the whole motion; camera
yaw/pitch/distance and light are jittered per clip, deterministically from
``(seed, action, object, index)``. Clips are written as H.264 mp4 (PyAV) under
``<out_dir>/clips/<action>/<object>_<NNN>.mp4``; the caption comes from the script
("A soccer ball bounces on the floor.").

Split: a few action-object combinations are held out whole (every clip ``"test"``,
``heldout: "combo"``) so compositional generalisation can be measured; every object and every
action of a held-out combination still occurs in training with other partners. Clips of the
other combinations split by ``sha1(id) % 10``: {0, 1} test (``heldout: "seen_combo"``), 2 val,
else train.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from ...progress import progress_bar

from ...deps import require
from ...errors import OneEncoderError
from ...fileio import atomic_path
from ..manifest import caption_group
from .pybullet_scenes import (CATALOG, Camera, ObjectSpec, bounds, data_path, framing_distance, load_floor,
                              load_object, physics_client, pybullet_module, rest_on_floor)

ACTIONS = ("drops", "bounces", "rolls", "slides", "spins", "topples")
PHYSICS_HZ = 240
STEPS_PER_FRAME = 30
N_FRAMES = 16
FPS = PHYSICS_HZ // STEPS_PER_FRAME  # 8
IMAGE_SIZE = 224
HELDOUT_FRACTION = 0.175  # share of valid combinations held out whole (default split)

_CAPTIONS = {
    "drops": "{noun} drops onto the floor.",
    "bounces": "{noun} bounces on the floor.",
    "rolls": "{noun} rolls across the floor.",
    "slides": "{noun} slides across the floor.",
    "spins": "{noun} spins in place.",
    "topples": "{noun} topples over.",
}

#: Catalog objects left out of every action (checked on rendered frame strips).
EXCLUDED = {
    "table": "only its tabletop collides, so the legs sink into the floor",
    "square_table": "a fixed-base multibody: given a mass, it falls through the floor",
}

_X, _Y, _Z = np.eye(3)
# Objects each action suits, checked on rendered frame strips. Bounces keep the objects that
# bounce straight up (the others tumble away at high restitution); rolls leaves out the toy
# "cylinder" (its cross-section is a 2:1 oval: it rocks to a stop); spins leaves out the plain
# red ball (a turn about the vertical is invisible on it); topples takes the tall objects whose
# centre of mass lets them fall (the mug's sits at its base, so it rights itself).
_PLAYS: dict[str, tuple[str, ...]] = {
    "drops": ("duck", "teddy", "soccer_ball", "mug", "bunny", "lego", "jenga", "domino", "tray", "torus",
              "cube", "sphere", "cylinder", "prism", "r2d2"),
    "bounces": ("soccer_ball", "lego", "jenga", "tray", "torus", "cube", "sphere"),
    "rolls": ("soccer_ball", "torus", "sphere"),
    "slides": ("duck", "teddy", "mug", "bunny", "lego", "jenga", "domino", "tray", "cube", "prism", "r2d2"),
    "spins": ("duck", "teddy", "soccer_ball", "mug", "bunny", "lego", "jenga", "domino", "tray", "torus",
              "cube", "cylinder", "prism", "r2d2"),
    "topples": ("domino", "jenga", "cylinder", "bunny", "r2d2", "cube"),
}
# Upright pose (rotation about a local axis, degrees) of the objects that topple.
_UPRIGHT = {"jenga": (_Y, 90.0), "cylinder": (_Y, 90.0)}
# Resting pose where the mesh's own is unstable (the trapezoidal prism stands on a slanted face).
_REST = {"prism": (_X, -90.0)}
# Lying pose for sliding: a standing domino would tip over instead of sliding.
_LYING = {"domino": (_Y, 90.0), **_REST}
# Local axis a rolling object turns about (balls: any).
_ROLL_AXIS = {"torus": _Y}
# Objects that pybullet_data ships as static (mass 0) but that move fine with a mass.
_MASS_IF_STATIC = 0.5


def caption(action: str, obj: str) -> str:
    """The scripted caption, e.g. ``caption("bounces", "soccer_ball")`` -> "A soccer ball bounces on the floor."."""
    noun = CATALOG[obj].noun
    return _CAPTIONS[action].format(noun=noun[:1].upper() + noun[1:])


def valid_combos(objects: Iterable[str] | None = None, actions: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Every ``(action, object)`` pair the scripts can play, in :data:`ACTIONS` then catalog order.

    Args:
        objects: Catalog names to use (default: all but :data:`EXCLUDED`).
        actions: Subset of :data:`ACTIONS` (default: all).

    Raises:
        OneEncoderError: an unknown or excluded object, or an unknown action.
    """
    objects = [o for o in CATALOG if o not in EXCLUDED] if objects is None else _names(objects)
    actions = list(ACTIONS) if actions is None else _names(actions)
    for o in objects:
        if o not in CATALOG or o in EXCLUDED:
            why = EXCLUDED.get(o, f"not in the catalog ({', '.join(CATALOG)})")
            raise OneEncoderError(f"video dataset: object {o!r} cannot be used: {why}")
    for a in actions:
        if a not in ACTIONS:
            raise OneEncoderError(f"video dataset: unknown action {a!r}; use some of {', '.join(ACTIONS)}")
    return [(a, o) for a in ACTIONS if a in actions for o in CATALOG if o in objects and o in _PLAYS[a]]


def _names(value: Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _stable_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def default_heldout(combos: list[tuple[str, str]], fraction: float = HELDOUT_FRACTION) -> list[tuple[str, str]]:
    """A fixed choice of about ``fraction`` of ``combos`` to hold out whole.

    Combinations are visited in sha1 order (independent of the seed, so splits compare across
    datasets); one is held out only if its action and its object each keep another, seen partner.
    """
    target = max(1, round(fraction * len(combos))) if len(combos) > 1 else 0
    partners_of_action = Counter(a for a, _ in combos)
    partners_of_object = Counter(o for _, o in combos)
    held = []
    for a, o in sorted(combos, key=lambda c: _stable_int(f"{c[0]}/{c[1]}")):
        if len(held) >= target:
            break
        if partners_of_action[a] > 1 and partners_of_object[o] > 1:
            partners_of_action[a] -= 1
            partners_of_object[o] -= 1
            held.append((a, o))
    return sorted(held, key=combos.index)


def clip_split(clip_id: str, combo_heldout: bool) -> tuple[str, str | None]:
    """``(split, heldout)`` of one clip: held-out combinations are all test."""
    if combo_heldout:
        return "test", "combo"
    b = _stable_int(clip_id) % 10
    return ("test", "seen_combo") if b in (0, 1) else ("val", None) if b == 2 else ("train", None)


def _normalise_heldout(pairs: Iterable[tuple[str, str]], combos: list[tuple[str, str]]) -> set[tuple[str, str]]:
    out = set()
    for pair in pairs:
        a, o = pair if pair[0] in ACTIONS else (pair[1], pair[0])  # accept (object, action) too
        if (a, o) not in combos:
            raise OneEncoderError(f"video dataset: held-out combination {pair!r} is not a valid "
                                  f"(action, object) pair of this dataset")
        out.add((a, o))
    return out


# ----- simulation ------------------------------------------------------------------------


@dataclass
class Clip:
    """One simulated clip.

    Attributes:
        frames: Rendered RGB ``uint8 [n_frames, H, W, 3]`` (empty with ``render=False``).
        heights: Height of the object's base (m) after every physics step, ``[steps + 1]``.
        positions: Base position at each rendered frame ``[n_frames, 3]``.
    """

    frames: np.ndarray
    heights: np.ndarray
    positions: np.ndarray


def _pb():
    return pybullet_module()


def _quat(axis: np.ndarray, degrees: float) -> tuple[float, ...]:
    return tuple(_pb().getQuaternionFromAxisAngle(list(axis), math.radians(degrees)))


def _qmul(a, b) -> tuple[float, ...]:
    """Rotation ``a`` applied after ``b``."""
    return tuple(_pb().multiplyTransforms([0, 0, 0], a, [0, 0, 0], b)[1])


def _rotate(q, v: np.ndarray) -> np.ndarray:
    m = np.asarray(_pb().getMatrixFromQuaternion(q)).reshape(3, 3)
    return m @ v


def _load(client: int, spec: ObjectSpec) -> int:
    """Load ``spec`` with its centre of mass at the geometry's centre and a mass (never static)."""
    p = _pb()
    if spec.path.endswith(".urdf"):
        body = load_object(client, spec)
        if p.getDynamicsInfo(body, -1, physicsClientId=client)[0] == 0:
            p.changeDynamics(body, -1, mass=_MASS_IF_STATIC, physicsClientId=client)
        return body
    # Some bare meshes (toys/*.obj) sit far from their origin, which pybullet takes as the
    # centre of mass: shift the shapes so the body turns about its middle.
    probe = load_object(client, spec)
    lo, hi = bounds(client, probe)
    p.removeBody(probe, physicsClientId=client)
    shift = list(-(lo + hi) / 2)
    path, scale = str(data_path() / spec.path), [spec.scale] * 3
    visual = p.createVisualShape(p.GEOM_MESH, fileName=path, meshScale=scale, visualFramePosition=shift,
                                 rgbaColor=list(spec.rgba or (0.7, 0.7, 0.7, 1.0)), physicsClientId=client)
    collision = p.createCollisionShape(p.GEOM_MESH, fileName=path, meshScale=scale,
                                       collisionFramePosition=shift, physicsClientId=client)
    return p.createMultiBody(0.5, collision, visual, [0, 0, 0], [0, 0, 0, 1], physicsClientId=client)


def _place(client: int, body: int, orn, lift: float = 0.0) -> None:
    """Orient ``body``, put its lowest point on the floor, then raise it by ``lift`` metres."""
    p = _pb()
    p.resetBasePositionAndOrientation(body, [0, 0, 1.0], orn, physicsClientId=client)
    rest_on_floor(client, body)
    pos, _ = p.getBasePositionAndOrientation(body, physicsClientId=client)
    p.resetBasePositionAndOrientation(body, [pos[0], pos[1], pos[2] + lift], orn, physicsClientId=client)


def _extent(client: int, body: int) -> np.ndarray:
    lo, hi = bounds(client, body)
    return hi - lo


def _script(client: int, floor: int, body: int, spec: ObjectSpec, action: str, rng: np.random.Generator) -> float:
    """Set the start pose, velocities and materials of ``action``; returns its heading (radians)."""
    p = _pb()
    yaw = _quat(_Z, rng.uniform(0, 360))
    natural = _quat(*_REST[spec.name]) if spec.name in _REST else (0.0, 0.0, 0.0, 1.0)

    def dyn(b: int, **kw: float) -> None:  # every link: r2d2's wheels touch the floor, not its base
        for link in range(-1, p.getNumJoints(b, physicsClientId=client)):
            p.changeDynamics(b, link, physicsClientId=client, **kw)

    heading = rng.uniform(0, 2 * math.pi)
    if action in ("drops", "bounces"):
        tilt_axis = np.array([*rng.normal(size=2), 0.0])
        # Bounces start level: a tilted impact turns into sideways tumbling.
        tilt = _quat(tilt_axis / (np.linalg.norm(tilt_axis) + 1e-9), rng.uniform(0, 25) if action == "drops" else 0.0)
        # 0.5-0.9 m for big objects; small ones fall less far so they stay large in the frame.
        size = float(_extent(client, body).max())
        lift = float(np.clip(rng.uniform(4.0, 7.0) * size, 0.35, 0.9))
        _place(client, body, _qmul(yaw, _qmul(tilt, natural)), lift=lift)
        if action == "bounces":
            dyn(body, restitution=0.95, rollingFriction=0.0, spinningFriction=0.0)
            dyn(floor, restitution=0.95)
    elif action == "rolls":
        _place(client, body, _qmul(yaw, natural))
        axis = _rotate(yaw, _ROLL_AXIS.get(spec.name, _Y))
        direction = np.cross(axis, _Z)  # horizontal, perpendicular to the roll axis
        direction *= rng.choice([-1.0, 1.0]) / np.linalg.norm(direction)
        radius = _extent(client, body)[2] / 2
        speed = rng.uniform(0.35, 0.6)  # 0.7-1.2 m in 2 s: the object stays large in the frame
        dyn(body, lateralFriction=1.0, rollingFriction=0.0, spinningFriction=0.0)
        # Rolling without slipping: omega = v / r about z x direction.
        p.resetBaseVelocity(body, list(direction * speed), list(np.cross(_Z, direction) * speed / radius),
                            physicsClientId=client)
        heading = math.atan2(direction[1], direction[0])
    elif action == "slides":
        pose = _LYING.get(spec.name)
        _place(client, body, _qmul(yaw, _quat(*pose) if pose else natural))
        dyn(body, lateralFriction=rng.uniform(0.1, 0.2), rollingFriction=0.0, spinningFriction=0.0)
        direction = np.array([math.cos(heading), math.sin(heading), 0.0])
        p.resetBaseVelocity(body, list(direction * rng.uniform(1.0, 1.6)), [0, 0, 0], physicsClientId=client)
    elif action == "spins":
        _place(client, body, _qmul(yaw, natural))
        # Little friction so it keeps turning for the whole clip without wandering off.
        dyn(body, lateralFriction=0.02, spinningFriction=0.0, rollingFriction=0.0)
        p.resetBaseVelocity(body, [0, 0, 0], [0, 0, rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 7.0)],
                            physicsClientId=client)
    elif action == "topples":
        pose = _UPRIGHT.get(spec.name)
        upright = _quat(*pose) if pose else natural
        _place(client, body, upright)
        lo, hi = bounds(client, body)
        com = np.asarray(p.getBasePositionAndOrientation(body, physicsClientId=client)[0])
        # Fall across the narrow side, tilted a few degrees past the tipping angle (centre of
        # mass above the edge it turns about), with a small push.
        fall_x = hi[0] - lo[0] <= hi[1] - lo[1]
        axis = 0 if fall_x else 1
        sign = rng.choice([-1.0, 1.0])
        edge = (hi[axis] - com[axis]) if sign > 0 else (com[axis] - lo[axis])
        tip = math.degrees(math.atan2(edge, com[2] - lo[2]))
        tilt_axis = _Y * sign if fall_x else -_X * sign
        _place(client, body, _qmul(yaw, _qmul(_quat(tilt_axis, tip + rng.uniform(2, 8)), upright)))
        fall = _rotate(yaw, _X * sign if fall_x else _Y * sign)
        p.resetBaseVelocity(body, [0, 0, 0], list(_rotate(yaw, tilt_axis) * rng.uniform(0.2, 0.8)),
                            physicsClientId=client)
        heading = math.atan2(fall[1], fall[0])
    else:
        raise OneEncoderError(f"unknown action {action!r}")
    return heading


def _clip_rng(seed: int, action: str, obj: str, index: int) -> np.random.Generator:
    return np.random.default_rng(_stable_int(f"{seed}/{action}/{obj}/{index}") % (1 << 63))


def simulate_clip(obj: str, action: str, seed: int = 0, index: int = 0, n_frames: int = N_FRAMES,
                  size: int = IMAGE_SIZE, render: bool = True) -> Clip:
    """Simulate (and render) one clip; the same arguments always give the same pixels.

    Args:
        obj: Catalog name.
        action: One of :data:`ACTIONS` that suits ``obj`` (see :func:`valid_combos`).
        seed: Dataset seed; with ``action``, ``obj`` and ``index`` it fixes every random choice.
        index: Clip number within the combination.
        n_frames: Frames to render, one every :data:`STEPS_PER_FRAME` physics steps from t = 0.
        size: Frame side in pixels.
        render: False to run the physics only (``frames`` is then empty).
    """
    if (action, obj) not in valid_combos([obj], [action]):
        raise OneEncoderError(f"video dataset: {obj!r} cannot {action!r}; see valid_combos()")
    p = _pb()
    rng = _clip_rng(seed, action, obj, index)
    spec = CATALOG[obj]
    with physics_client() as client:
        p.setTimeStep(1.0 / PHYSICS_HZ, physicsClientId=client)
        floor = load_floor(client)
        body = _load(client, spec)
        heading = _script(client, floor, body, spec, action, rng)
        states, heights, positions, lo, hi = [], [], [], np.full(3, np.inf), np.full(3, -np.inf)
        for step in range((n_frames - 1) * STEPS_PER_FRAME + 1):
            if step:
                p.stepSimulation(physicsClientId=client)
            pos, _ = p.getBasePositionAndOrientation(body, physicsClientId=client)
            heights.append(pos[2])
            if step % STEPS_PER_FRAME == 0:
                positions.append(pos)
                a, b = bounds(client, body)
                lo, hi = np.minimum(lo, a), np.maximum(hi, b)
                if render:
                    states.append(p.saveState(physicsClientId=client))
        frames = []
        if render:
            # The camera is fixed for the clip and frames the whole motion, so render afterwards.
            camera, light = _camera(rng, lo, hi, heading, size)
            for state in states:
                p.restoreState(state, physicsClientId=client)
                frames.append(camera.render(client, light)[0])
    empty = np.zeros((0, size, size, 3), np.uint8)
    return Clip(np.stack(frames) if frames else empty, np.asarray(heights), np.asarray(positions))


def _camera(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, heading: float,
            size: int) -> tuple[Camera, tuple[float, float, float]]:
    """A camera that sees the box ``lo..hi`` (all positions of the object), roughly side-on to ``heading``."""
    radius = max(float(np.linalg.norm(hi - lo)) / 2, 0.08)
    # yaw 0 looks along +y (image right = +x): yaw = heading puts the motion across the image.
    yaw = math.degrees(heading) + rng.uniform(-25, 25) + rng.choice([0.0, 180.0])
    # fill <= 0.85: framing_distance is a tangent rule, a sphere any larger pokes out of the view.
    distance = framing_distance(radius, fill=rng.uniform(0.65, 0.85))
    azimuth = rng.uniform(0, 2 * math.pi)
    light = (math.cos(azimuth), math.sin(azimuth), rng.uniform(1.0, 3.0))
    target = tuple(float(v) for v in (lo + hi) / 2)
    return Camera(target, distance, yaw, rng.uniform(-40, -12), size=size), light


# ----- files and records -------------------------------------------------------------------


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` -> planar YUV 4:2:0 ``uint8 [H * 3 / 2, W]`` (PyAV's layout), BT.601 limited range.

    H must be a multiple of 4 and W even, so each chroma plane packs into whole rows.
    """
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape

    def quantise(plane: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8)

    def half(plane: np.ndarray) -> np.ndarray:  # 2x2 mean: the 4:2:0 chroma sample
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)

    return np.concatenate([quantise(y), quantise(half(u)), quantise(half(v))])


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Encode RGB ``uint8 [T, H, W, 3]`` frames as lossless H.264 (yuv420p) mp4, atomically.

    Lossless, with the YUV conversion done here, so regenerating the data gives the same
    decoded pixels: lossy x264 made different encoding choices for the same frames from run
    to run, and that moved video results between identical runs. Renders compress well
    losslessly (about 20 KB per 16-frame clip).
    """
    av = require("av")
    if frames.shape[1] % 4 or frames.shape[2] % 2:
        raise OneEncoderError(f"{path}: frames are {frames.shape[2]}x{frames.shape[1]}; "
                              "yuv420p here needs an even width and a height divisible by 4")
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")))
        container.mux(stream.encode())


def _write_keyframe(path: str | Path, frame: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(frame)).save(tmp, format="PNG")


def video_records(out_dir: str | Path, clips_per_combo: int = 8,
                  heldout_combos: tuple[tuple[str, str], ...] | None = None, seed: int = 0,
                  objects: tuple[str, ...] | None = None, actions: tuple[str, ...] | None = None,
                  progress: bool = True) -> list[dict]:
    """Simulate and write every clip (skipping ones already on disk); one record per clip.

    Args:
        out_dir: Clips go to ``<out_dir>/clips/<action>/<object>_<NNN>.mp4``.
        clips_per_combo: Clips of each valid (action, object) combination.
        heldout_combos: ``(action, object)`` pairs whose clips are all test; None: the fixed
            :func:`default_heldout` choice; ``()``: none.
        seed: Fixes every random choice (poses, speeds, camera, light).
        objects: Catalog names to use (default: all but :data:`EXCLUDED`).
        actions: Actions to use (default: :data:`ACTIONS`).
        progress: Show a progress bar.

    Returns:
        Records ``{"id", "video", "image", "caption", "object", "action", "group", "split",
        "heldout", "n_frames", "fps"}`` sorted by action, object and index, with absolute paths.
        ``image`` is the clip's middle frame as a PNG (for emergent video<->image retrieval).
    """
    if clips_per_combo < 1:
        raise OneEncoderError(f"video dataset: clips_per_combo={clips_per_combo}; use at least 1")
    combos = valid_combos(objects, actions)
    if not combos:
        raise OneEncoderError("video dataset: no valid (action, object) combination for these objects and actions")
    held = set(default_heldout(combos)) if heldout_combos is None else _normalise_heldout(heldout_combos, combos)
    root = Path(os.path.abspath(out_dir))  # absolute: records work from any folder; the manifest writer relativises
    records = []
    for action, obj in combos:
        text = caption(action, obj)
        for index in range(clips_per_combo):
            cid = f"{action}/{obj}_{index:03d}"
            split, heldout = clip_split(cid, (action, obj) in held)
            records.append({"id": cid, "video": str(root / "clips" / action / f"{obj}_{index:03d}.mp4"),
                            "caption": text, "object": obj, "action": action, "group": caption_group(text),
                            "image": str(root / "keyframes" / action / f"{obj}_{index:03d}.png"),
                            "split": split, "heldout": heldout, "n_frames": N_FRAMES, "fps": FPS,
                            "_index": index})
    for rec in progress_bar(records, desc="video clips", unit="clip", enabled=progress):
        # Resume: finished clips are never re-simulated (the keyframe is written last).
        if not (Path(rec["video"]).exists() and Path(rec["image"]).exists()):
            clip = simulate_clip(rec["object"], rec["action"], seed=seed, index=rec["_index"])
            write_mp4(rec["video"], clip.frames)
            _write_keyframe(rec["image"], clip.frames[len(clip.frames) // 2])
    for rec in records:
        del rec["_index"]
    return records


def summarize(records: list[dict]) -> dict[str, int]:
    """Counts of clips, combinations, objects, actions, splits and held-out combinations."""
    splits = Counter(r["split"] for r in records)
    combos = {(r["action"], r["object"]) for r in records}
    held = {(r["action"], r["object"]) for r in records if r.get("heldout") == "combo"}
    return {
        "clips": len(records),
        "combos": len(combos),
        "heldout_combos": len(held),
        "objects": len({r["object"] for r in records}),
        "actions": len({r["action"] for r in records}),
        **{f"split_{k}": v for k, v in sorted(splits.items())},
        **{f"action_{a}": n for a, n in sorted(Counter(r["action"] for r in records).items())},
    }
