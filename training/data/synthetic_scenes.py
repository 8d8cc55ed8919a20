"""synthetic-scenes: ray-cast indoor rooms, the built-in stand-in for NYU-v2.

Each sample is a box-shaped room (floor, four walls, ceiling, framed pictures on the walls) holding
4-7 primitives (yaw-rotated boxes, spheres, upright cylinders), seen by a pinhole camera standing
1.2-1.8 m high near one wall and looking slightly down into the room. Every pixel casts one ray;
analytic ray-primitive intersections give the nearest hit, from which all targets follow exactly:

- ``segmentation``: class of the hit surface, `CLASSES`; -1 = invalid.
- ``depth``: metric z-depth of the hit along the optical axis (like NYU), 0 = invalid.
- ``normal``: the hit surface's geometric unit normal in the camera frame (x right, y down,
  z forward, the OpenCV convention), always facing the camera (``dot(normal, ray) < 0``);
  (0, 0, 0) = invalid. It is consistent with depth: the floor has one normal everywhere.
- ``edges``: 1 where two classes or two objects meet (wall meets wall is no boundary), 2 px wide
  at the rendered size; -1 = invalid. Only when asked for by name (not among the default tasks).

The RGB image is Lambertian shading (ambient + one shadow-casting and one optional soft light) of
procedural per-class textures (planks/tiles/carpet floors, plain/striped/panelled walls, crates
and cabinets, striped or spotted balls, ringed pillars, noisy paintings), followed by colour
jitter and sensor noise, so classes must be told apart by texture and shape, not colour alone.
About 3-7 % of pixels are marked invalid as NYU-v2 does (smooth blobs, sometimes a 1-px band at
the left and right borders); the image is rendered normally there.

World frame: y up, floor at y = 0, the room spans [0, W] x [0, H] x [0, D].
Options: ``cache`` (bool; on for <= 4096 samples within ~1 GiB), ``invalid_pixels`` (bool, True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from training.data import render, synthetic
from training.data.registry import DatasetInfo, DatasetSpec, register_dataset
from training.tasks import TaskSpec

NAME = "synthetic-scenes"
CLASSES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder", "picture")
FLOOR, WALL, CEILING, BOX, SPHERE, CYLINDER, PICTURE = range(len(CLASSES))
TASKS = (
    TaskSpec("segmentation", "segmentation", len(CLASSES), CLASSES),
    TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3),
    TaskSpec("edges", "edges", 1),
)
DEFAULT_TASKS = TASKS[:3]  # what a data set spec without a task list gets
DEFAULT_SIZE = (96, 128)
DEFAULT_LENGTHS = {"train": 800, "val": 200, "test": 200}
OPTIONS = {"cache": None, "invalid_pixels": True}
EPS = 1e-3  # metres: hits closer than this along a ray are the ray's own surface
# Room face f = 2 * axis + (1 on the far side): its class and inward normal (world).
FACE_LABELS = np.array([WALL, WALL, FLOOR, CEILING, WALL, WALL], np.int64)
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32)


@dataclass(frozen=True)
class Camera:
    origin: np.ndarray  # (3,) world position
    axes: np.ndarray  # (3, 3), columns = camera x (right), y (down), z (forward) in world
    focal: float  # pixels


@dataclass(frozen=True)
class Primitive:
    label: int  # BOX, SPHERE or CYLINDER
    centre: np.ndarray  # (3,); a cylinder's centre is on the floor
    size: np.ndarray  # box: half extents; sphere: (r, r, r); cylinder: (r, height, r)
    yaw: float
    colours: np.ndarray  # (2, 3) main and secondary colour
    style: int


@dataclass(frozen=True)
class Picture:
    face: int  # room face it hangs on
    lo: np.ndarray  # (2,) (along-wall, height) lower corner
    hi: np.ndarray
    colours: np.ndarray  # (3, 3) frame, paint 1, paint 2


@dataclass(frozen=True)
class Scene:
    room: np.ndarray  # (3,) width, height, depth
    camera: Camera
    objects: tuple[Primitive, ...]
    pictures: tuple[Picture, ...]
    lights: tuple[tuple[np.ndarray, float], ...]  # (position, intensity); the first casts shadows
    ambient: float
    floor: tuple[np.ndarray, int]  # (colours (2, 3), style) of the floor
    wall: tuple[np.ndarray, int]
    ceiling: np.ndarray  # (3,)


# --------------------------------------------------------------------------- scene sampling


def sample_scene(rng: np.random.Generator, width_px: int) -> Scene:
    """A random room, camera, furniture, pictures and lights."""
    room = np.array([rng.uniform(3.5, 6.5), rng.uniform(2.4, 3.2), rng.uniform(4.5, 7.5)])
    camera = sample_camera(rng, room, width_px)
    objects: list[Primitive] = []
    for _ in range(rng.integers(4, 8)):
        obj = sample_object(rng, room, camera, objects)
        if obj is not None:
            objects.append(obj)
    pictures = tuple(sample_picture(rng, room) for _ in range(rng.integers(1, 4)))
    lights = [(np.array([rng.uniform(0.5, room[0] - 0.5), room[1] - 0.3, rng.uniform(1.0, room[2] - 0.5)]),
               rng.uniform(0.7, 1.0))]
    if rng.random() < 0.5:
        lights.append((np.array([rng.uniform(0, room[0]), room[1] - 0.3, rng.uniform(0, room[2])]),
                       rng.uniform(0.15, 0.35)))
    colour = partial(render.random_colour, rng)
    floor = np.stack([colour((0.04, 0.12), (0.0, 0.6), (0.35, 0.7)), colour(sat=(0, 0.4), val=(0.2, 0.8))])
    wall = np.stack([colour(sat=(0.05, 0.3), val=(0.6, 0.9)), colour(sat=(0.1, 0.5), val=(0.4, 0.8))])
    return Scene(room, camera, tuple(objects), pictures, tuple(lights), rng.uniform(0.25, 0.4),
                 (floor, int(rng.integers(3))), (wall, int(rng.integers(3))),
                 colour(sat=(0, 0.08), val=(0.8, 0.95)))


def sample_camera(rng: np.random.Generator, room: np.ndarray, width_px: int) -> Camera:
    """A camera near the z = 0 wall, looking into the room and slightly down."""
    origin = np.array([rng.uniform(0.3, 0.7) * room[0], rng.uniform(1.2, 1.8), rng.uniform(0.3, 1.0)])
    yaw, pitch, roll = rng.uniform(-0.5, 0.5), rng.uniform(0.12, 0.4), rng.uniform(-0.05, 0.05)
    forward = np.array([np.sin(yaw) * np.cos(pitch), -np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    right, down = np.cos(roll) * right + np.sin(roll) * down, np.cos(roll) * down - np.sin(roll) * right
    focal = width_px / 2 / np.tan(np.radians(rng.uniform(55, 65)) / 2)
    return Camera(origin, np.stack([right, down, forward], axis=1), float(focal))


def sample_object(rng: np.random.Generator, room: np.ndarray, camera: Camera,
                  placed: list[Primitive]) -> Primitive | None:
    """One primitive on the floor (or a ball on a box), in front of the camera, not overlapping
    others; None when no free spot is found quickly."""
    draw = rng.random()
    label = BOX if draw < 0.45 else SPHERE if draw < 0.7 else CYLINDER
    colours = np.stack([render.random_colour(rng, sat=(0.3, 0.85), val=(0.35, 0.85)),
                        render.random_colour(rng, sat=(0.0, 0.8), val=(0.5, 0.95))])
    style, yaw = int(rng.integers(3)), rng.uniform(-np.pi, np.pi)
    if label == BOX:
        size = np.array([rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.8), rng.uniform(0.15, 0.6)])
    elif label == SPHERE:
        size = np.full(3, rng.uniform(0.2, 0.55))
        boxes = [p for p in placed if p.label == BOX]
        if boxes and rng.random() < 0.3:  # a ball resting on a box
            box = boxes[int(rng.integers(len(boxes)))]
            centre = box.centre + [0.0, box.size[1] + size[0], 0.0]
            return Primitive(label, centre, size, yaw, colours, style)
    else:
        r = rng.uniform(0.15, 0.45)
        size = np.array([r, rng.uniform(0.4, 2.0), r])
    foot = math.hypot(size[0], size[2])
    (ox, _, oz), (fx, _, fz) = camera.origin.tolist(), camera.axes[:, 2].tolist()
    fx, fz = fx / math.hypot(fx, fz), fz / math.hypot(fx, fz)
    spots = rng.uniform(foot + 0.05, [room[0] - foot - 0.05, room[2] - foot - 0.05], size=(20, 2))
    for x, z in spots.tolist():
        if math.hypot(x - ox, z - oz) < foot + 0.6 or (x - ox) * fx + (z - oz) * fz < 0.5:
            continue  # too close to the camera, or behind it
        if all(math.dist((x, z), p.centre[[0, 2]]) > foot + math.hypot(*p.size[[0, 2]]) for p in placed):
            height = 0.0 if label == CYLINDER else size[1]
            return Primitive(label, np.array([x, height, z]), size, yaw, colours, style)
    return None


def sample_picture(rng: np.random.Generator, room: np.ndarray) -> Picture:
    """A framed picture on the far wall or a side wall."""
    face = int(rng.choice([0, 1, 5]))
    span = room[2] if face < 2 else room[0]  # walls 0/1 (x = const) run along z
    w, h = rng.uniform(0.5, min(1.4, span - 0.4)), rng.uniform(0.4, 1.0)
    a, b = rng.uniform(w / 2 + 0.2, span - w / 2 - 0.2), rng.uniform(1.2, 1.8)
    colours = np.stack([render.random_colour(rng, sat=(0, 0.5), val=(0.05, 0.4))]
                       + [render.random_colour(rng, sat=(0.4, 0.9), val=(0.4, 0.9)) for _ in range(2)])
    return Picture(face, np.array([a - w / 2, b - h / 2]), np.array([a + w / 2, b + h / 2]), colours)


# --------------------------------------------------------------------------- geometry
# Vectors are stored component-first, (3, ...), like the normal target (see `render`).
dot, _col, rotate_y, frac = render.dot, render.as_column, render.rotate_y, render.frac


def intersect(prim: Primitive, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Ray parameter t of the first hit on ``prim`` beyond EPS (inf where missed)."""
    if prim.label == BOX:
        return render.ray_box(prim.centre, prim.size, prim.yaw, o, d, EPS)
    if prim.label == SPHERE:
        return render.ray_sphere(prim.centre, float(prim.size[0]), o, d, EPS)
    return render.ray_cylinder(prim.centre, float(prim.size[0]), float(prim.size[1]), o, d, EPS)


def bounding_sphere(prim: Primitive) -> tuple[np.ndarray, float]:
    if prim.label == CYLINDER:
        return prim.centre + [0.0, prim.size[1] / 2, 0.0], float(np.hypot(prim.size[0], prim.size[1] / 2))
    return prim.centre, float(np.linalg.norm(prim.size) if prim.label == BOX else prim.size[0])


def surface_normal(prim: Primitive, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (world) of ``prim`` at its surface points ``p`` (3, k)."""
    if prim.label == BOX:
        return render.box_normal(prim.centre, prim.size, prim.yaw, p)
    if prim.label == SPHERE:
        return (p - _col(prim.centre, p)) / np.float32(prim.size[0])
    return render.cylinder_normal(prim.centre, float(prim.size[0]), float(prim.size[1]), p)


# --------------------------------------------------------------------------- textures
# Each returns albedo (3, k) for surface points (3, k).


def floor_texture(scene: Scene, rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Wooden planks, checker tiles with grout, or carpet (styles 0, 1, 2)."""
    (main, second), style = scene.floor
    a, b = (p[0], p[2]) if rng.random() < 0.5 else (p[2], p[0])
    if style == 0:
        width, length, table = rng.uniform(0.12, 0.25), rng.uniform(0.8, 1.6), rng.random(64)
        i = np.floor(a / width)
        along = b / length + render.cell_hash(i, i, table)
        shade = (0.75 + 0.35 * render.cell_hash(i, np.floor(along), table)) * \
                (0.85 + 0.3 * render.value_noise(rng, a / width * 2, b * 3, cells=16))
        return main[:, None] * np.where((frac(a / width) < 0.06) | (frac(along) < 0.02), 0.55, shade)
    if style == 1:
        size = rng.uniform(0.3, 0.6)
        odd = ((np.floor(a / size) + np.floor(b / size)) % 2).astype(bool)
        grout = (frac(a / size) < 0.04) | (frac(b / size) < 0.04)
        return np.where(grout, 0.75, np.where(odd, main[:, None], second[:, None]))
    return main[:, None] * (0.7 + 0.6 * render.value_noise(rng, a * 12, b * 12, cells=32, octaves=2))


def wall_texture(scene: Scene, rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mottled paint, wallpaper stripes, or a panelled lower part with a rail (styles 0, 1, 2);
    ``a`` runs along the wall, ``b`` is the height."""
    (main, second), style = scene.wall
    main, second = main[:, None], second[:, None]
    out = main * (0.88 + 0.24 * render.value_noise(rng, a * 1.5, b * 1.5, octaves=2))
    if style == 1:
        out = np.where(frac(a / rng.uniform(0.1, 0.3)) < 0.5, out, 0.6 * out + 0.4 * second)
    elif style == 2:
        rail = rng.uniform(0.8, 1.1)
        out = np.where(b < rail, second * np.where(frac(a / 0.6) < 0.04, 0.7, 1.0), out)
        out = np.where(np.abs(b - rail) < 0.03, 0.5 * second, out)
    return out


def picture_texture(pic: Picture, rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A dark frame around a two-colour noise 'painting'."""
    u, v = (a - pic.lo[0]) / (pic.hi[0] - pic.lo[0]), (b - pic.lo[1]) / (pic.hi[1] - pic.lo[1])
    mix = render.value_noise(rng, u * 3, v * 3, cells=8, octaves=2)
    out = pic.colours[1][:, None] * mix + pic.colours[2][:, None] * (1 - mix)
    border = 0.05 / (pic.hi - pic.lo)
    frame = (u < border[0]) | (u > 1 - border[0]) | (v < border[1]) | (v > 1 - border[1])
    return np.where(frame, pic.colours[0][:, None], out)


def object_texture(prim: Primitive, rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Boxes: crate slats, cabinet frame with drawers, or mottled. Spheres and cylinders: sectors
    or vertical stripes, horizontal bands, then spots (spheres) or brushed metal (cylinders)."""
    main, second = prim.colours[0][:, None], prim.colours[1][:, None]
    rel = p - _col(prim.centre, p)
    if prim.label == BOX:
        return _box_texture(prim, rng, rel)
    angle = np.arctan2(rel[2], rel[0])
    if prim.style == 2:
        mix = render.value_noise(rng, angle * 2, rel[1] * 8, cells=16)
        return np.where(mix > 0.6, second, main) if prim.label == SPHERE else main * (0.7 + 0.6 * mix)
    coord = angle / (2 * np.pi) * 8 if prim.style == 0 else rel[1] / 0.15
    return np.where(np.floor(coord) % 2 == 0, main, second)


def _box_texture(prim: Primitive, rng: np.random.Generator, rel: np.ndarray) -> np.ndarray:
    main, second = prim.colours[0][:, None], prim.colours[1][:, None]
    q = rotate_y(rel, -prim.yaw) / _col(prim.size, rel)
    if prim.style == 0:
        slat = np.floor(rel[1] / 0.12) % 2
        return main * np.where(frac(rel[1] / 0.12) < 0.12, 0.5, 0.8 + 0.25 * slat)
    if prim.style == 1:
        edge = np.sort(np.abs(q), axis=0)[1] > 0.88
        drawer = np.abs(frac((q[1] + 1) * 1.5) - 0.5) > 0.47
        return np.where(edge | drawer, second * 0.6, main)
    return main * (0.65 + 0.7 * render.value_noise(rng, (q[0] + q[2]) * 4, q[1] * 4))


# --------------------------------------------------------------------------- rendering


def primary_hits(scene: Scene, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of every camera ray: (t, room face, object index or -1 for the room)."""
    cam = scene.camera
    t, face = render.ray_room(scene.room, cam.origin, d)
    hit = np.full(t.shape, -1)
    for k, prim in enumerate(scene.objects):
        rows, cols = render.sphere_window(*bounding_sphere(prim), cam.origin, cam.axes, cam.focal, *t.shape)
        tk = intersect(prim, cam.origin, d[:, rows, cols])
        closer = tk < t[rows, cols]
        t[rows, cols][closer] = tk[closer]
        hit[rows, cols][closer] = k
    return t, face, hit


def surfaces(scene: Scene, rng: np.random.Generator, p: np.ndarray, face: np.ndarray,
             hit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World normals (3, H, W), class labels (H, W) and albedo (3, H, W) at the hits ``p``.
    Pixels are handled through flat index lists: numpy's take is far faster than 2-D masks."""
    flat_p = p.reshape(3, -1)
    normal = np.stack([np.take(FACE_NORMALS[:, c], face) for c in range(3)])  # room faces point inwards
    label, albedo = np.take(FACE_LABELS, face), np.zeros_like(p)
    flat_n, flat_a, flat_l = normal.reshape(3, -1), albedo.reshape(3, -1), label.reshape(-1)
    for k, prim in enumerate(scene.objects):
        idx = np.flatnonzero(hit == k)
        q = np.take(flat_p, idx, axis=1)
        flat_n[:, idx], flat_a[:, idx] = surface_normal(prim, q), object_texture(prim, rng, q)
        flat_l[idx] = prim.label
    idx = np.flatnonzero(label == FLOOR)
    flat_a[:, idx] = floor_texture(scene, rng, np.take(flat_p, idx, axis=1))
    idx = np.flatnonzero(label == CEILING)
    q = np.take(flat_p, idx, axis=1)
    flat_a[:, idx] = scene.ceiling[:, None] * (0.94 + 0.12 * render.value_noise(rng, q[0], q[2]))
    idx = np.flatnonzero(label == WALL)
    f = np.take(face, idx)
    a, b = np.where(f < 2, np.take(flat_p[2], idx), np.take(flat_p[0], idx)), np.take(flat_p[1], idx)
    colour = wall_texture(scene, rng, a, b)
    for pic in scene.pictures:
        on = (f == pic.face) & (a >= pic.lo[0]) & (a <= pic.hi[0]) & (b >= pic.lo[1]) & (b <= pic.hi[1])
        flat_l[idx[on]] = PICTURE
        colour[:, on] = picture_texture(pic, rng, a[on], b[on])
    flat_a[:, idx] = colour
    return normal, label, albedo


def lighting(scene: Scene, p: np.ndarray, normal: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Ambient plus Lambertian point lights with distance falloff; the first light casts shadows
    of the objects onto the floor (where they are seen; elsewhere they are rarely visible)."""
    shade = np.full(p.shape[1:], scene.ambient, np.float32)
    for k, (pos, intensity) in enumerate(scene.lights):
        to_light = _col(pos, p) - p
        dist = np.sqrt(dot(to_light, to_light))
        towards = to_light / dist
        lambert = np.clip(dot(normal, towards), 0, None)
        if k == 0:
            lambert[shadowed(scene, p[:, floor], towards[:, floor], dist[floor], floor)] = 0.0
        shade += np.float32(intensity) * lambert / (1 + 0.04 * dist ** 2)
    return shade


def shadowed(scene: Scene, origin: np.ndarray, ray: np.ndarray, length: np.ndarray,
             where: np.ndarray) -> np.ndarray:
    """Image mask of the points ``where`` (origins (3, k)) whose segment towards the light
    crosses an object. Only rays passing within an object's bounding sphere are intersected."""
    out = np.zeros(length.shape, bool)
    origin = origin + np.float32(2e-3) * _col([0.0, 1.0, 0.0], origin)  # lift off the floor
    for prim in scene.objects:
        centre, radius = bounding_sphere(prim)
        to_centre = _col(centre, origin) - origin
        along = dot(to_centre, ray)
        sel = np.flatnonzero((dot(to_centre, to_centre) - along ** 2 < radius ** 2) & (along > -radius))
        out[sel[intersect(prim, origin[:, sel], ray[:, sel]) < length[sel]]] = True
    mask = np.zeros(where.shape, bool)
    mask[where] = out
    return mask


def render_scene(rng: np.random.Generator, size: tuple[int, int],
                 invalid_pixels: bool = True) -> dict[str, np.ndarray]:
    """One sample: image (3, H, W) and every task's target in its `training.tasks` layout."""
    h, w = size
    scene = sample_scene(rng, w)
    d = render.camera_rays(scene.camera.axes, scene.camera.focal, h, w)
    t, face, hit = primary_hits(scene, d)
    p = _col(scene.camera.origin, d) + t * d
    normal, label, albedo = surfaces(scene, rng, p, face, hit)
    rgb = albedo * lighting(scene, p, normal, label == FLOOR)
    normal = np.einsum("ji,jhw->ihw", scene.camera.axes.astype(np.float32), normal)  # world -> camera
    normal /= np.sqrt(dot(normal, normal))
    out = {"image": render.finish_image(rgb, rng, blur=0.3), "segmentation": label,
           "depth": t[None].astype(np.float32), "normal": normal.astype(np.float32),
           "edges": render.boundaries(label, hit)}  # hit: the object index, -1 for the room
    if invalid_pixels:
        bad = render.invalid_mask(rng, h, w)
        out["segmentation"][bad] = -1
        out["depth"][:, bad] = 0.0
        out["normal"][:, bad] = 0.0
        out["edges"][:, bad] = -1.0
    return out


@register_dataset(NAME)
def build(split: str, spec: DatasetSpec) -> tuple[synthetic.SyntheticDataset, DatasetInfo]:
    """Build one split of synthetic-scenes (defaults: 96x128, 800/200/200 samples)."""
    options = synthetic.resolve_options(NAME, spec.options, OPTIONS)
    synthetic.require_bool(NAME, options, "invalid_pixels")
    size = synthetic.resolve_size(NAME, spec, DEFAULT_SIZE)
    length = synthetic.resolve_length(NAME, spec, DEFAULT_LENGTHS, split)
    tasks = synthetic.resolve_tasks(NAME, TASKS, spec.tasks, DEFAULT_TASKS)
    renderer = partial(render_scene, invalid_pixels=options["invalid_pixels"])
    cache = synthetic.resolve_cache(NAME, options, length, size)
    dataset = synthetic.SyntheticDataset(split=split, spec=spec, tasks=tasks, image_size=size, length=length,
                                      renderer=renderer, cache=cache)
    return dataset, DatasetInfo(NAME, tasks, size)
