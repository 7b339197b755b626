"""RGB-D renders of single ``pybullet_data`` objects, paired as depth-image samples.

Each object of :data:`~.pybullet_scenes.CATALOG` is rendered alone (no floor) from
random viewpoints with pybullet's CPU renderer. Every render writes

* ``<out_dir>/rgb/<object>/<object>_<NNN>.png``: RGB, background set to white
  (the image adapter was trained on cut-outs on white), and
* ``<out_dir>/depth/<object>/<object>_<NNN>.npz``: float32 metric depth in metres,
  background 0.0 ("no return", as real depth sensors report it), compressed losslessly
  (about 35 KB instead of 200 KB: most of a render is background).

Viewpoints are drawn from a generator seeded by ``(seed, object, index)``, so a rerun
renders identical files; a render whose two files exist is not rendered again.

Splits: objects in ``heldout_objects`` are test only (``heldout: "object"``); the
other objects' renders are split by a hash of their id (``heldout: "pose"`` for
val/test: unseen viewpoints of seen objects).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from ...progress import progress_bar

from ...errors import OneEncoderError
from ...fileio import atomic_path
from ..manifest import caption_group
from .pybullet_scenes import (CATALOG, Camera, ObjectSpec, bounds, framing_distance, load_object, physics_client,
                              pybullet_module)

# Three objects that look unlike anything left in training (an organic mesh, a
# multi-link robot, an open box), so "object" held-out numbers test generalisation.
DEFAULT_HELDOUT: tuple[str, ...] = ("bunny", "r2d2", "tray")

FOV = 60.0
IMAGE_SIZE = 224
_TIP_PROBABILITY = 0.25  # share of views with the object lying on its side
_PITCH_RANGE = (-70.0, -10.0)  # degrees; negative looks down at the object
_DISTANCE_JITTER = (0.8, 1.3)  # times the framing distance
_LIGHT_ELEVATION = (20.0, 80.0)  # degrees above the horizon


def render_id(name: str, index: int) -> str:
    """Manifest id of render ``index`` of object ``name``, e.g. ``"duck/duck_007"``."""
    return f"{name}/{name}_{index:03d}"


def caption_for(spec: ObjectSpec) -> str:
    """Tux Paint-style caption: ``"a rubber duck"`` -> ``"A rubber duck."``."""
    noun = spec.noun.strip()
    return noun[:1].upper() + noun[1:] + "."


def pose_split(sample_id: str) -> str:
    """Split of a render of a training object: test for hash buckets {0, 1}, val for 2."""
    bucket = int(hashlib.sha1(sample_id.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket in (0, 1) else "val" if bucket == 2 else "train"


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    # A string hash, not Python's hash(): identical across processes and machines.
    digest = hashlib.sha256(f"{seed}/{name}/{index}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _view(rng: np.random.Generator) -> dict[str, Any]:
    """One random viewpoint; rounded so the record holds exactly what was rendered."""
    tipped = bool(rng.random() < _TIP_PROBABILITY)
    light_az = math.radians(rng.uniform(0.0, 360.0))
    light_el = math.radians(rng.uniform(*_LIGHT_ELEVATION))
    return {
        "object_yaw": round(float(rng.uniform(0.0, 2 * math.pi)), 4),
        "object_roll": round(float(rng.choice([-1.0, 1.0]) * math.pi / 2), 4) if tipped else 0.0,
        "yaw": round(float(rng.uniform(0.0, 360.0)), 3),
        "pitch": round(float(rng.uniform(*_PITCH_RANGE)), 3),
        "jitter": round(float(rng.uniform(*_DISTANCE_JITTER)), 4),
        "light": [round(math.cos(light_el) * math.cos(light_az), 4),
                  round(math.cos(light_el) * math.sin(light_az), 4), round(math.sin(light_el), 4)],
    }


def _place(client: int, body: int, view: dict[str, Any]) -> tuple[tuple[float, float, float], float]:
    """Orient the body at the origin; return the camera target and framing distance."""
    p = pybullet_module()

    orn = p.getQuaternionFromEuler([view["object_roll"], 0.0, view["object_yaw"]])
    p.resetBasePositionAndOrientation(body, [0.0, 0.0, 0.0], orn, physicsClientId=client)
    lo, hi = bounds(client, body)
    centre = tuple(float(v) for v in (lo + hi) / 2)
    radius = float(np.linalg.norm(hi - lo) / 2)
    return centre, round(framing_distance(radius, FOV) * view["jitter"], 4)


def _write(rgb: np.ndarray, depth: np.ndarray, seg: np.ndarray, image_path: Path, depth_path: Path) -> None:
    background = seg < 0
    rgb = rgb.copy()
    rgb[background] = 255
    depth = np.where(background, np.float32(0.0), depth).astype(np.float32)
    with atomic_path(depth_path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, depth=depth)  # a file handle: numpy would add ".npz" to a bare temp name
    with atomic_path(image_path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def rgbd_records(
    out_dir: str | Path,
    renders_per_object: int = 60,
    heldout_objects: tuple[str, ...] = DEFAULT_HELDOUT,
    seed: int = 0,
    objects: tuple[str, ...] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Render (or reuse) every view and return one manifest record per render.

    Args:
        out_dir: Folder that receives ``rgb/`` and ``depth/``.
        renders_per_object: Views rendered of each object.
        heldout_objects: Objects seen only in the test split.
        seed: Base seed; views depend only on ``(seed, object, index)``.
        objects: Catalog names to render (default: the whole catalog).
        progress: Show a progress bar.

    Returns:
        Records sorted by object then index, with ``id``, ``image``, ``depth`` (absolute paths),
        ``caption``, ``object``, ``group``, ``split``, ``heldout`` and ``camera``.

    Raises:
        OneEncoderError: An unknown object name, or pybullet is missing.
    """
    names = tuple(objects) if objects is not None else tuple(CATALOG)
    unknown = sorted(set(names) - set(CATALOG))
    if unknown:
        raise OneEncoderError(f"unknown pybullet object(s) {unknown}; known: {', '.join(CATALOG)}")
    if renders_per_object < 1:
        raise OneEncoderError(f"renders_per_object={renders_per_object}; use at least 1")
    out = Path(os.path.abspath(out_dir))  # absolute: records work from any folder; the manifest writer relativises
    heldout = set(heldout_objects)
    records: list[dict] = []
    bar = progress_bar(total=len(names) * renders_per_object, desc="render rgbd", unit="view", enabled=progress)
    with physics_client() as client:
        for name in names:
            spec = CATALOG[name]
            caption = caption_for(spec)
            body = None
            for index in range(renders_per_object):
                sid = render_id(name, index)
                image_path, depth_path = out / "rgb" / f"{sid}.png", out / "depth" / f"{sid}.npz"
                view = _view(_rng(seed, name, index))
                # Placing is cheap; rendering is skipped when both files already exist.
                if body is None:
                    body = load_object(client, spec, fixed=True)
                target, distance = _place(client, body, view)
                if not (image_path.is_file() and depth_path.is_file()):
                    camera = Camera(target, distance, view["yaw"], view["pitch"], fov=FOV, size=IMAGE_SIZE)
                    _write(*camera.render(client, light_direction=view["light"]), image_path, depth_path)
                split = "test" if name in heldout else pose_split(sid)
                records.append({
                    "id": sid,
                    "image": str(image_path),
                    "depth": str(depth_path),
                    "caption": caption,
                    "object": name,
                    "group": caption_group(caption),
                    "split": split,
                    "heldout": "object" if name in heldout else ("pose" if split != "train" else None),
                    "camera": {"fov": FOV, "distance": distance, "yaw": view["yaw"], "pitch": view["pitch"]},
                })
                bar.update(1)
            if body is not None:
                p = pybullet_module()

                p.removeBody(body, physicsClientId=client)
    bar.close()
    return records


def summarize(records: list[dict]) -> dict[str, int]:
    """Counts for the CLI: renders, objects, renders per split and per held-out kind."""
    splits = Counter(r["split"] for r in records)
    kinds = Counter(r["heldout"] for r in records if r.get("heldout"))
    return {
        "renders": len(records),
        "objects": len({r["object"] for r in records}),
        **{f"split_{k}": v for k, v in sorted(splits.items())},
        **{f"heldout_{k}": v for k, v in sorted(kinds.items())},
    }
