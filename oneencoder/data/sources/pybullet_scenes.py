"""Shared pybullet helpers for the depth and video datasets: the object catalog, a
headless physics client, object loading and a CPU camera.

Everything comes from the PyPI package ``pybullet`` 3.2.7 and the meshes it ships in
``pybullet_data``; nothing is downloaded. Rendering uses ``ER_TINY_RENDERER`` (CPU).
Metric depth from the OpenGL depth buffer ``d`` is ``z = far*near / (far - (far-near)*d)``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...deps import require
from ...errors import OneEncoderError

INSTALL_HINT = "install it with `pip install pybullet==3.2.7` (or run `make setup`)"


@dataclass(frozen=True)
class ObjectSpec:
    """One object of ``pybullet_data``.

    Attributes:
        name: Short id, e.g. ``"duck"``.
        noun: Noun phrase used in captions, e.g. ``"a rubber duck"``.
        path: File relative to ``pybullet_data``: a ``.urdf`` or a mesh (``.obj``).
        scale: Global scaling, chosen so objects are roughly 0.1-0.6 m across.
        rgba: Colour for bare meshes (URDFs keep their own materials and textures).
        rolls: Round enough to roll when pushed, so it is never scripted to slide.
    """

    name: str
    noun: str
    path: str
    scale: float = 1.0
    rgba: tuple[float, float, float, float] | None = None
    rolls: bool = False


CATALOG: dict[str, ObjectSpec] = {s.name: s for s in (
    ObjectSpec("duck", "a rubber duck", "duck_vhacd.urdf", 1.0),
    ObjectSpec("teddy", "a teddy bear", "teddy_vhacd.urdf", 1.0),
    ObjectSpec("soccer_ball", "a soccer ball", "soccerball.urdf", 0.3, rolls=True),
    ObjectSpec("mug", "a coffee mug", "objects/mug.urdf", 1.0),
    ObjectSpec("bunny", "a toy rabbit", "bunny.obj", 0.1, (0.85, 0.75, 0.6, 1.0)),
    ObjectSpec("table", "a wooden table", "table/table.urdf", 0.5),
    ObjectSpec("square_table", "a square table", "table_square/table_square.urdf", 0.5),
    ObjectSpec("lego", "a lego brick", "lego/lego.urdf", 3.0),
    ObjectSpec("jenga", "a wooden block", "jenga/jenga.urdf", 2.0),
    ObjectSpec("domino", "a domino", "domino/domino.urdf", 3.0),
    ObjectSpec("tray", "a tray", "tray/traybox.urdf", 0.4),
    ObjectSpec("torus", "a ring", "torus/torus_textured.obj", 0.1, (0.8, 0.3, 0.2, 1.0), rolls=True),
    ObjectSpec("cube", "a cube", "cube.urdf", 0.2),
    ObjectSpec("sphere", "a red ball", "sphere2red.urdf", 0.25, rolls=True),
    ObjectSpec("cylinder", "a cylinder", "toys/cylinder.obj", 1.0, (0.2, 0.5, 0.9, 1.0), rolls=True),
    ObjectSpec("prism", "a triangular prism", "toys/prism.obj", 1.0, (0.3, 0.8, 0.3, 1.0)),
    ObjectSpec("r2d2", "a small robot", "r2d2.urdf", 0.4),
)}


def data_path() -> Path:
    """Folder of the meshes shipped with pybullet (``pybullet_data``)."""
    pybullet_data = require("pybullet_data", "pybullet")
    return Path(pybullet_data.getDataPath())


@contextlib.contextmanager
def physics_client(gravity: float = -9.81) -> Iterator[int]:
    """A headless (``DIRECT``) pybullet client; disconnected on exit."""
    p = pybullet_module()
    client = p.connect(p.DIRECT)
    if client < 0:
        raise OneEncoderError("pybullet could not start a DIRECT physics client")
    try:
        p.setAdditionalSearchPath(str(data_path()), physicsClientId=client)
        p.setGravity(0, 0, gravity, physicsClientId=client)
        yield client
    finally:
        p.disconnect(physicsClientId=client)


def pybullet_module():
    """The ``pybullet`` module, imported without its "build time" banner on stdout."""
    if "pybullet" in sys.modules:
        return sys.modules["pybullet"]
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)  # the banner is printed by C code, past sys.stdout
            import pybullet
    except ImportError:
        raise OneEncoderError(f"the PyPI package `pybullet` is not installed; {INSTALL_HINT}") from None
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return pybullet



def load_object(client: int, spec: ObjectSpec, position=(0.0, 0.0, 0.0), orientation=(0.0, 0.0, 0.0, 1.0),
                fixed: bool = False, mass: float = 0.5) -> int:
    """Load ``spec`` into the scene and return its body id."""
    p = pybullet_module()
    path = data_path() / spec.path
    if not path.is_file():
        raise OneEncoderError(f"pybullet_data has no {spec.path}; reinstall pybullet ({INSTALL_HINT})")
    if path.suffix == ".urdf":
        return p.loadURDF(str(path), list(position), list(orientation), useFixedBase=fixed,
                          globalScaling=spec.scale, physicsClientId=client)
    scale = [spec.scale] * 3
    visual = p.createVisualShape(p.GEOM_MESH, fileName=str(path), meshScale=scale,
                                 rgbaColor=list(spec.rgba or (0.7, 0.7, 0.7, 1.0)), physicsClientId=client)
    collision = p.createCollisionShape(p.GEOM_MESH, fileName=str(path), meshScale=scale, physicsClientId=client)
    return p.createMultiBody(0.0 if fixed else mass, collision, visual, list(position), list(orientation),
                             physicsClientId=client)


def load_floor(client: int) -> int:
    """The ground plane of ``pybullet_data`` (``plane.urdf``)."""
    return pybullet_module().loadURDF("plane.urdf", physicsClientId=client)


def bounds(client: int, body: int) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box (min, max) of a body and all its links."""
    p = pybullet_module()
    lo, hi = (np.array(v) for v in p.getAABB(body, -1, physicsClientId=client))
    for link in range(p.getNumJoints(body, physicsClientId=client)):
        a, b = (np.array(v) for v in p.getAABB(body, link, physicsClientId=client))
        lo, hi = np.minimum(lo, a), np.maximum(hi, b)
    return lo, hi


def rest_on_floor(client: int, body: int) -> None:
    """Shift a body so its lowest point touches z = 0."""
    p = pybullet_module()
    lo, _ = bounds(client, body)
    pos, orn = p.getBasePositionAndOrientation(body, physicsClientId=client)
    p.resetBasePositionAndOrientation(body, [pos[0], pos[1], pos[2] - lo[2]], orn, physicsClientId=client)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking at ``target`` from ``distance`` metres (yaw/pitch in degrees)."""

    target: tuple[float, float, float]
    distance: float
    yaw: float
    pitch: float
    fov: float = 60.0
    size: int = 224
    near: float = 0.05
    far: float = 10.0

    def render(self, client: int, light_direction=(1.0, 1.0, 2.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render with the CPU renderer.

        Returns:
            RGB ``uint8 [H, W, 3]``, metric depth in metres ``float32 [H, W]`` (``far`` where
            nothing was hit) and the segmentation mask ``int32 [H, W]`` (body id, -1 = background).
        """
        p = pybullet_module()
        view = p.computeViewMatrixFromYawPitchRoll(list(self.target), self.distance, self.yaw, self.pitch, 0, 2)
        proj = p.computeProjectionMatrixFOV(self.fov, 1.0, self.near, self.far)
        _, _, rgba, depth_buffer, seg = p.getCameraImage(
            self.size, self.size, view, proj, lightDirection=list(light_direction),
            renderer=p.ER_TINY_RENDERER, physicsClientId=client)
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(self.size, self.size, 4)[..., :3]
        d = np.asarray(depth_buffer, dtype=np.float64).reshape(self.size, self.size)
        depth = (self.far * self.near / (self.far - (self.far - self.near) * d)).astype(np.float32)
        return rgb.copy(), depth, np.asarray(seg, dtype=np.int32).reshape(self.size, self.size)


def framing_distance(radius: float, fov: float = 60.0, fill: float = 0.9) -> float:
    """Camera distance at which a sphere of ``radius`` fills ``fill`` of the view height."""
    return radius / (fill * math.tan(math.radians(fov) / 2))
