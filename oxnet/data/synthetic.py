"""Synthetic chest X-rays with lesions of the OXnet paper's nine classes (numpy and Pillow only).

Each image is a frontal (PA) chest radiograph drawn from smooth analytic shapes: soft tissue and
shoulders, two lung fields with vessel markings, the diaphragm and a gastric bubble, heart, mediastinum,
trachea and aortic knob, spine, posterior and anterior ribs, clavicles, and film noise. Lesions change
the anatomy the way they do on real films, so a detector has to learn what distinguishes them:

=====================  =====================================================================
Aortic calcification   thin bright arc on the aortic knob (upper left mediastinum)
Cardiomegaly           heart widened to a cardiothoracic ratio of about 0.55-0.65; box = heart
Fracture               a rib broken across with a displaced lateral fragment
Mass                   large (> 3 cm) lobulated round opacity
Nodule                 small (< 3 cm) sharp round opacity
Pleural effusion       homogeneous basal opacity with a meniscus; costophrenic angle blunted
Pneumonia              patchy, ill-defined consolidation in the middle or lower zone
Pneumothorax           apical/lateral lucent rim without vessel markings, thin visceral pleural line
Tuberculosis           upper-zone cluster of small nodules with streaks, sometimes a cavity
=====================  =====================================================================

The image side is taken as 40 cm (a typical PA detector), so 3 cm is 7.5 % of the side.

    python -m oxnet.data.synthetic --contact-sheet sheet.png        # 16 samples with boxes and names
    python -m oxnet.data.synthetic --write-coco out/ -n 300         # PNGs + COCO JSON (nih-cxr layout)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from oxnet.classes import NO_FINDING, PAPER_CLASSES

(
    AORTIC_CALCIFICATION,
    CARDIOMEGALY,
    FRACTURE,
    MASS,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMONIA,
    PNEUMOTHORAX,
    TUBERCULOSIS,
) = range(9)


class Sample(NamedTuple):
    """One synthetic chest X-ray.

    Attributes:
        image: ``ndarray[S, S]`` uint8 (or uint16 with ``bit_depth=16``), bright = dense.
        boxes: ``ndarray[K, 4]`` float32 in (x1, y1, x2, y2) pixels.
        labels: ``ndarray[K]`` int64, indices into ``PAPER_CLASSES``.
        image_labels: sorted indices of the classes present; empty = "No Finding".
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    image_labels: tuple[int, ...]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function (via tanh, which does not overflow)."""
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _rib_curve(d):
    """Drop of a posterior rib below its height at the spine, at lateral distance ``d``."""
    return -0.35 * d + 1.6 * d**2


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise ``ndarray[size, size]`` with unit-ish variance: ``cells`` random values per side, bicubic."""
    coarse = Image.fromarray(rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


class _Chest:
    """One radiograph under construction, on a grid of normalised coordinates (x right, y down, in [0, 1]).

    The film is rendered from three layers: ``thickness`` (soft tissue crossed by the beam), ``air``
    (aerated lung depth, subtracted) and ``bone`` (bone and calcium, added). Lesions edit the layers;
    each lesion method returns its box (x1, y1, x2, y2) in pixels.
    The image's left is the patient's right: ``side`` -1 is the right lung, +1 the left lung.
    """

    def __init__(self, size: int, rng: np.random.Generator, *, cardiomegaly: bool, fracture: bool) -> None:
        self.size, self.rng = size, rng
        self.px = 1.0 / size
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.x, self.y = grid[None, :], grid[:, None]
        u = rng.uniform
        self.cx = 0.5 + u(-0.015, 0.015)
        self.scale = u(0.94, 1.04)
        self.top = u(0.1, 0.13)  # lung apices
        self.base = u(0.74, 0.79)  # costophrenic angles
        self.dome = (self.base - u(0.1, 0.13), self.base - u(0.07, 0.1))  # right dome higher (liver)
        # cardiothoracic ratio 0.38-0.48 normal, 0.56-0.66 enlarged (thorax width about 0.8 * scale)
        ratio = u(0.56, 0.66) if cardiomegaly else u(0.38, 0.48)
        self.heart_half = ratio * 0.8 * self.scale / 2
        self.heart_x = self.cx + 0.35 * self.heart_half  # two thirds of the heart lie left of midline
        self.knob = (self.cx + u(0.075, 0.09), u(0.28, 0.31), u(0.026, 0.032))
        self.rib_spacing = u(0.054, 0.06)
        # a fracture is planned before the ribs are drawn: (side, rib, lateral distance, displacement)
        self.fracture: tuple[int, int, float, float] | None = (
            (int(rng.choice([-1, 1])), int(rng.integers(2, 8)), u(0.2, 0.34), u(0.012, 0.02) * rng.choice([-1, 1]))
            if fracture
            else None
        )
        shape = (size, size)
        self.thickness = np.zeros(shape, np.float32)
        self.bone = np.zeros(shape, np.float32)
        self.opacity = np.zeros(shape, np.float32)  # fraction of lung air replaced by lesions
        self.lucency = np.zeros(shape, np.float32)  # extra air (pneumothorax)
        self.clear = np.ones(shape, np.float32)  # where vessel markings are visible
        self.lungs = self.lung_mask(-1) + self.lung_mask(1)
        self.heart = self.heart_mask()

    # ----- anatomy -------------------------------------------------------------------------------
    def lung_value(self, side: int, x, y, *, about=None, ratio: float = 1.0):
        """Superellipse value of one lung (< 1 inside); ``about``/``ratio`` shrink it towards a point."""
        if about is not None:
            x = about[0] + (x - about[0]) / ratio
            y = about[1] + (y - about[1]) / ratio
        medial = self.cx + side * (0.05 if side < 0 else 0.065)
        lateral = self.cx + side * 0.39 * self.scale
        centre, half = 0.5 * (medial + lateral), 0.5 * abs(lateral - medial)
        t = np.clip((y - self.top) / (self.base - self.top), 0.0, 1.0)
        width = half * (0.4 + 0.6 * t**0.3)  # rounded apex, wide base
        height = (self.base - self.top) * 0.62
        return np.abs((x - centre) / width) ** 3 + np.abs((y - self.top - height) / height) ** 2

    def diaphragm(self, side: int, x):
        """Height of one hemidiaphragm at ``x``: a dome highest medially of the lung's middle."""
        peak = self.cx + side * 0.15 * self.scale
        return self.dome[0 if side < 0 else 1] + 2.4 * (x - peak) ** 2 / self.scale

    def lung_mask(self, side: int, *, cut: bool = True, **shrink) -> np.ndarray:
        """Soft mask ``ndarray[S, S]`` of one lung, cut by its hemidiaphragm unless ``cut=False``."""
        mask = _sigmoid((1.0 - self.lung_value(side, self.x, self.y, **shrink)) / 0.04)
        if cut:
            mask = mask * _sigmoid((self.diaphragm(side, self.x) - self.y) / (1.5 * self.px))
        return mask

    def in_lung(self, x: float, y: float) -> bool:
        """The point lies well inside a lung field and off the heart."""
        side = -1 if x < self.cx else 1
        heart = ((x - self.heart_x) / self.heart_half) ** 2 + ((y - self.dome[1]) / 0.2) ** 2
        return bool(self.lung_value(side, x, y) < 0.75 and y < self.diaphragm(side, x) - 0.03 and heart > 1.2)

    def heart_mask(self) -> np.ndarray:
        """Soft mask of the cardiac silhouette, wider to the image right (patient's left)."""
        x, y = self.x, self.y
        half = np.where(x > self.heart_x, 1.2, 0.8) * self.heart_half
        value = ((x - self.heart_x) / half) ** 2 + ((y - self.dome[1] - 0.02) / 0.2) ** 2
        return _sigmoid((1.0 - value) / 0.05) * _sigmoid((y - 0.38) / 0.03) * _sigmoid((self.dome[1] + 0.03 - y) / 0.01)

    def draw_anatomy(self) -> None:
        """Draw the normal anatomy into the layers (ribs with the planned fracture, if any)."""
        x, y, cx, rng = self.x, self.y, self.cx, self.rng
        # torso thinning towards the flanks, neck, shoulders
        half = 0.45 * self.scale
        torso = np.clip(1.0 - np.abs((x - cx) / half) ** 5, 0.0, 1.0) ** 0.6 * _sigmoid((y - 0.05) / 0.03)
        neck = np.clip(1.0 - np.abs((x - cx) / 0.12) ** 4, 0.0, 1.0) ** 0.5
        shoulders = _sigmoid((0.26 - y) / 0.05) * _sigmoid((0.5 - np.abs(x - cx)) / 0.02) * 0.7
        self.thickness += 0.75 * np.maximum(np.maximum(torso, neck), shoulders)
        self.body = np.clip(self.thickness * 4.0, 0.0, 1.0)
        for side in (-1, 1):  # humeral heads
            distance = np.hypot(x - cx - side * 0.46 * self.scale, (y - 0.15) * 0.9)
            self.bone += 0.22 * _sigmoid((0.06 - distance) / 0.004) * (0.6 + 0.4 * _sigmoid((distance - 0.045) / 0.004))
        # mediastinum and heart are denser than the chest wall next to them
        mediastinum = _sigmoid((0.055 - np.abs(x - cx - 0.005)) / 0.012) * _sigmoid((y - 0.08) / 0.03)
        kx, ky, kr = self.knob
        knob = _sigmoid((kr - np.hypot(x - kx, y - ky)) / 0.005)
        self.mediastinum = np.maximum(np.maximum(mediastinum, knob), self.heart)
        self.thickness += 0.06 * self.mediastinum
        trachea = _sigmoid((0.014 - np.abs(x - cx)) / 0.003) * _sigmoid((0.33 - y) / 0.01)
        self.thickness -= 0.1 * trachea * _sigmoid((y - 0.02) / 0.02)
        # spine: vertebral bodies with pedicles, dimmer behind the heart
        spine = _sigmoid((0.034 - np.abs(x - cx)) / 0.004)
        discs = 1.0 - 0.5 * np.cos(np.pi * (y - rng.uniform(0, 0.05)) / 0.05) ** 16
        pedicles = np.exp(-(((np.abs(x - cx) - 0.026) / 0.004) ** 2))
        self.bone += (0.1 * spine * discs + 0.06 * pedicles) * (1.0 - 0.5 * self.heart)
        # abdomen under the domes, the gastric bubble under the left one
        for side in (-1, 1):
            below = _sigmoid((y - self.diaphragm(side, x)) / self.px) * _sigmoid(side * (x - cx) / 0.01)
            self.thickness += 0.1 * below
        bx, by = cx + 0.19 * self.scale, self.diaphragm(1, cx + 0.19 * self.scale) + 0.045
        bubble = _sigmoid((1.0 - ((x - bx) / 0.045) ** 2 - ((y - by) / 0.022) ** 2) / 0.3)
        self.thickness -= 0.07 * bubble * rng.uniform(0.3, 1.0)
        self.draw_ribs()
        self.draw_clavicles()

    def draw_ribs(self) -> None:
        """Posterior ribs (arcs from the spine, drooping laterally) and faint anterior ribs."""
        x, y, cx = self.x, self.y, self.cx
        d = np.abs(x - cx)  # lateral distance, [1, S]
        side = np.sign(x - cx)
        first = self.top - 0.01
        # rib index coordinate k: rib k runs along y = first + k * spacing + _rib_curve(d)
        k = (y - first - _rib_curve(d)) / self.rib_spacing  # [S, S]
        nearest = np.round(k)
        if self.fracture is not None:
            fs, fk, fd, shift = self.fracture
            on_rib = (nearest == fk) & (side == fs)
            k = k - on_rib * shift / self.rib_spacing * _sigmoid((d - fd) / 0.003)
            nearest = np.round(k)
        jitter = self.rng.normal(0.0, 0.06, 12)[np.clip(nearest, 0, 11).astype(np.intp)]
        distance = np.abs(k - nearest - jitter) * self.rib_spacing
        thick = 0.009 + 0.012 * d
        band = _sigmoid((thick - distance) / 0.002)
        cortex = np.exp(-(((distance - thick) / 0.003) ** 2))
        reach = _sigmoid((d - 0.035) / 0.008) * _sigmoid((0.42 * self.scale - d) / 0.02)
        below = _sigmoid((y - self.diaphragm(1, x) * (side > 0) - self.diaphragm(-1, x) * (side <= 0)) / 0.01)
        ribs = (0.5 * band + 0.5 * cortex) * reach * (nearest >= 0) * (nearest < 11) * (1.0 - 0.6 * below)
        if self.fracture is not None:
            slant = d - fd + 0.5 * (k - nearest) * self.rib_spacing
            ribs = ribs * (1.0 - on_rib * np.exp(-((slant / 0.005) ** 2)))
        self.bone += 0.13 * ribs
        # anterior ribs slope down towards the sternum and fade medially (costal cartilage)
        ka = (y - self.top - 0.1 - 0.35 * (0.42 - d)) / (self.rib_spacing * 1.3)
        distance = np.abs(ka - np.round(ka)) * self.rib_spacing * 1.3
        anterior = _sigmoid((0.008 - distance) / 0.003) * _sigmoid((d - 0.17) / 0.03) * reach
        self.bone += 0.035 * anterior * (ka > -0.5) * (ka < 5.5)

    def draw_clavicles(self) -> None:
        x, y, cx = self.x, self.y, self.cx
        d = np.abs(x - cx)
        centre = self.top + 0.055 - 0.12 * (d - 0.05) + 0.35 * (d - 0.2) ** 2
        clavicle = _sigmoid((0.012 - np.abs(y - centre)) / 0.003)
        self.bone += 0.14 * clavicle * _sigmoid((d - 0.035) / 0.01) * _sigmoid((0.36 * self.scale - d) / 0.02)

    def draw_markings(self) -> np.ndarray:
        """Vessel markings ``ndarray[S, S]`` in [0, 1]: branching, tapering trees from each hilum."""
        size, rng = self.size, self.rng
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for side in (-1, 1):
            hilum = (self.cx + side * 0.11, rng.uniform(0.4, 0.46))
            stack = [(hilum, rng.uniform(-1.4, 1.4) + (math.pi if side < 0 else 0.0), 2.6, 0) for _ in range(12)]
            while stack:
                (px, py), angle, width, depth = stack.pop()
                length = rng.uniform(0.05, 0.09) * (1.0 - 0.15 * depth)
                nx, ny = px + length * math.cos(angle), py + length * math.sin(angle)
                fill = int(min(255, 60 + 50 * width))
                draw.line([(px * size, py * size), (nx * size, ny * size)], fill=fill, width=max(1, round(width * size / 256)))
                if depth < 3:
                    for turn in (-1, 1):
                        stack.append(((nx, ny), angle + turn * rng.uniform(0.15, 0.5), width * 0.72, depth + 1))
        canvas = canvas.filter(ImageFilter.GaussianBlur(0.8 * size / 256))
        return np.asarray(canvas, np.float32) / 255.0

    # ----- lesions: each edits the layers and returns its box (x1, y1, x2, y2) in pixels ------------
    def lung_point(self, y_range: tuple[float, float]) -> tuple[float, float]:
        """A random point well inside a lung field, off the heart and off earlier lesions, with y in ``y_range``."""
        for _ in range(200):
            x, y = self.rng.uniform(0.1, 0.9), self.rng.uniform(*y_range)
            i, j = int(y * self.size), int(x * self.size)
            if self.in_lung(x, y) and self.opacity[i, j] < 0.2 and self.lucency[i, j] < 0.01:
                return x, y
        return self.cx - 0.2, 0.5 * (y_range[0] + y_range[1])

    def box(self, mask: np.ndarray, threshold: float = 0.5, pad: float = 1.0) -> tuple[float, ...]:
        """Pixel box (x1, y1, x2, y2) around ``mask > threshold``, grown by ``pad`` pixels."""
        rows = np.flatnonzero(mask.max(1) > threshold)
        cols = np.flatnonzero(mask.max(0) > threshold)
        return (cols[0] - pad, rows[0] - pad, cols[-1] + 1 + pad, rows[-1] + 1 + pad)

    def ball(self, x0: float, y0: float, radius, edge: float) -> np.ndarray:
        """A sphere's projected density (1 at the centre), ``radius`` scalar or per-pixel."""
        r2 = ((self.x - x0) ** 2 + (self.y - y0) ** 2) / radius**2
        return np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)) * 0.6 + 0.4 * _sigmoid((1.0 - np.sqrt(r2)) * radius / edge)

    def add_opacity(self, density: np.ndarray) -> None:
        """Let a lesion's density (fraction of lung air it replaces, in [0, 1]) join the others."""
        self.opacity = 1.0 - (1.0 - self.opacity) * (1.0 - np.clip(density, 0.0, 1.0))

    def nodule(self) -> tuple[float, ...]:
        x0, y0 = self.lung_point((self.top + 0.08, self.base - 0.1))
        radius = self.rng.uniform(0.009, 0.022)  # 0.7-1.8 cm
        self.add_opacity(self.rng.uniform(0.55, 0.8) * self.ball(x0, y0, radius, 0.002))
        return self.box(self.ball(x0, y0, radius, 0.002), 0.3)

    def mass(self) -> tuple[float, ...]:
        x0, y0 = self.lung_point((self.top + 0.12, self.base - 0.14))
        theta = np.arctan2(self.y - y0, self.x - x0)
        p1, p2 = self.rng.uniform(0, 2 * np.pi, 2)
        radius = self.rng.uniform(0.042, 0.07) * (1 + 0.1 * np.sin(3 * theta + p1) + 0.06 * np.sin(5 * theta + p2))
        density = self.ball(x0, y0, radius, 0.004) * self.lungs
        self.add_opacity(self.rng.uniform(0.75, 0.95) * density)
        return self.box(density, 0.3)

    def pneumonia(self) -> tuple[float, ...]:
        x0, y0 = self.lung_point((0.42, self.base - 0.08))
        rng, spread = self.rng, self.rng.uniform(0.035, 0.065)
        patch = np.zeros_like(self.opacity)
        for _ in range(rng.integers(6, 12)):
            bx, by = x0 + rng.normal(0, spread), y0 + rng.normal(0, spread * 0.8)
            sigma = rng.uniform(0.015, 0.03)
            patch = np.maximum(patch, np.exp(-((self.x - bx) ** 2 + (self.y - by) ** 2) / (2 * sigma**2)))
        patch = patch * np.clip(0.85 + 0.25 * _smooth_noise(rng, self.size, 20), 0.0, 1.0) * self.lungs
        self.add_opacity(rng.uniform(0.7, 0.9) * patch)
        return self.box(patch, 0.35)

    def tuberculosis(self) -> tuple[float, ...]:
        rng = self.rng
        x0, y0 = self.lung_point((self.top + 0.04, 0.33))
        lesion: np.ndarray = np.zeros_like(self.opacity)
        for _ in range(rng.integers(8, 16)):
            nx, ny = x0 + rng.normal(0, 0.02), y0 + rng.normal(0, 0.02)
            lesion = np.maximum(lesion, rng.uniform(0.4, 0.8) * self.ball(nx, ny, rng.uniform(0.004, 0.009), 0.002))
        fibrosis = np.exp(-((self.x - x0) ** 2 + (self.y - y0) ** 2) / (2 * 0.03**2))
        lesion = np.maximum(lesion, 0.55 * fibrosis * np.clip(0.7 + 0.6 * _smooth_noise(rng, self.size, 40), 0, 1))
        if rng.random() < 0.5:  # cavity: a thick-walled ring with air inside
            radius = rng.uniform(0.014, 0.022)
            r = np.hypot(self.x - x0, self.y - y0)
            lesion = np.maximum(lesion, np.exp(-(((r - radius) / 0.005) ** 2)))
            lesion = lesion * (1.0 - 0.85 * _sigmoid((radius - 0.004 - r) / 0.002))
        lesion = lesion * self.lungs
        self.add_opacity(rng.uniform(0.6, 0.85) * lesion)
        return self.box(lesion, 0.3)

    def effusion(self) -> tuple[float, ...]:
        side = int(self.rng.choice([-1, 1]))
        lateral = np.clip((side * (self.x - self.cx) - 0.06) / (0.31 * self.scale), 0.0, 1.0)
        level = self.dome[0 if side < 0 else 1] - self.rng.uniform(0.02, 0.14)
        meniscus = level - 0.08 * lateral**2  # fluid climbs the lateral chest wall
        fluid = self.lung_mask(side, cut=False) * _sigmoid((self.y - meniscus) / 0.006)
        fluid = fluid * _sigmoid((self.base + 0.01 - self.y) / 0.004)
        self.add_opacity(fluid)
        self.thickness += 0.06 * fluid
        return self.box(fluid, 0.5)

    def pneumothorax(self) -> tuple[float, ...]:
        rng, side = self.rng, int(self.rng.choice([-1, 1]))
        about = (self.cx + side * 0.12, 0.52)
        ratio = rng.uniform(0.78, 0.9)
        collapsed = self.lung_mask(side, about=about, ratio=ratio)
        extent = _sigmoid((rng.uniform(0.42, 0.66) - self.y) / 0.03)  # apical and upper lateral
        gap = np.clip(self.lung_mask(side) - collapsed, 0.0, 1.0) * extent
        self.lucency += 0.12 * gap
        self.clear *= 1.0 - gap
        value = self.lung_value(side, self.x, self.y, about=about, ratio=ratio)
        line = np.exp(-(((value - 1.0) / 0.05) ** 2)) * extent * self.lung_mask(side, cut=False)
        self.thickness += 0.08 * line
        self.add_opacity(0.12 * collapsed)  # the collapsed lung is denser
        return self.box(gap, 0.4, pad=2.0)

    def aortic_calcification(self) -> tuple[float, ...]:
        kx, ky, kr = self.knob
        r = np.hypot(self.x - kx, self.y - ky)
        theta = np.arctan2(self.y - ky, self.x - kx)
        start = self.rng.uniform(-1.5, -0.9)  # upper-lateral to lateral rim, against the lung
        span = self.rng.uniform(1.0, 1.6)
        window = _sigmoid((theta - start) / 0.08) * _sigmoid((start + span - theta) / 0.08)
        arc = np.exp(-(((r - kr + 0.004) / 0.004) ** 2)) * window
        self.bone += self.rng.uniform(0.35, 0.5) * arc
        return self.box(arc, 0.3, pad=2.0)

    def cardiomegaly(self) -> tuple[float, ...]:
        above = _sigmoid((self.dome[1] + 0.04 - self.y) / self.px)
        return self.box(self.heart * above, 0.5)

    def fracture_box(self) -> tuple[float, ...]:
        # registered as a finding's box only when the fracture was planned (FRACTURE in findings)
        side, k, d, shift = cast("tuple[int, int, float, float]", self.fracture)
        x = self.cx + side * d
        y = self.top - 0.01 + k * self.rib_spacing + _rib_curve(d) + shift / 2
        half = 0.028
        return tuple(v * self.size for v in (x - half, y - half, x + half, y + half))

    # ----- film -------------------------------------------------------------------------------------
    def render(self, bit_depth: int) -> np.ndarray:
        """The film ``ndarray[S, S]`` (uint8 or uint16): lungs with markings, layers, exposure, noise."""
        rng = self.rng
        t = np.clip(1.0 - self.lung_value(-1, self.x, self.y), 0, 1) + np.clip(1.0 - self.lung_value(1, self.x, self.y), 0, 1)
        depth = 0.7 + 0.3 * np.sqrt(t)  # more air in the middle of a lung than at its edges
        marks = self.draw_markings() * self.clear
        air = self.lungs * (1.0 - 0.95 * self.mediastinum) * depth * (1.0 - 0.3 * marks)
        air = air * (1.0 - self.opacity) + self.lucency * self.lungs
        density = self.thickness - 0.62 * air + self.bone
        density = density + 0.015 * _smooth_noise(rng, self.size, 20) * self.body
        image = np.clip(density / 1.1, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
        image = image + rng.normal(0.0, 0.01, image.shape) + 0.015
        top = 2**bit_depth - 1
        return np.clip(np.round(image * top), 0, top).astype(np.uint8 if bit_depth == 8 else np.uint16)


def generate(
    n: int,
    size: int = 256,
    seed: int = 0,
    *,
    normal_fraction: float = 0.2,
    max_lesions: int = 3,
    bit_depth: int = 8,
) -> list[Sample]:
    """Draw ``n`` synthetic chest X-rays.

    Image ``i`` depends only on (``seed``, ``i``, the keyword settings), not on ``n``.

    Args:
        n: number of images.
        size: side S of the square images in pixels.
        seed: random seed.
        normal_fraction: share of images without any finding ("No Finding").
        max_lesions: an abnormal image has 1..max_lesions findings of distinct classes.
        bit_depth: 8 (uint8) or 16 (uint16).

    Returns:
        A list of :class:`Sample` (image, boxes in (x1, y1, x2, y2) pixels, class indices into
        ``PAPER_CLASSES``, image-level class indices).
    """
    if n < 0 or size < 32:
        raise ValueError(f"need n >= 0 and size >= 32, got n={n}, size={size}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not 0.0 <= normal_fraction <= 1.0 or not 1 <= max_lesions <= len(PAPER_CLASSES):
        raise ValueError(f"need normal_fraction in [0, 1] and max_lesions in [1, 9], got {normal_fraction}, {max_lesions}")
    return [_sample(np.random.default_rng([seed, i]), size, normal_fraction, max_lesions, bit_depth) for i in range(n)]


def _sample(rng: np.random.Generator, size: int, normal_fraction: float, max_lesions: int, bit_depth: int) -> Sample:
    """Pick the findings of one image (none with probability ``normal_fraction``) and draw it."""
    findings: list[int] = []
    if rng.random() >= normal_fraction:
        count = int(rng.integers(1, max_lesions + 1))
        findings = sorted(rng.choice(len(PAPER_CLASSES), size=count, replace=False).tolist())
    return _draw(rng, size, findings, bit_depth)


def _draw(rng: np.random.Generator, size: int, findings: Sequence[int], bit_depth: int) -> Sample:
    """Draw one chest with the given (distinct, sorted) findings."""
    chest = _Chest(size, rng, cardiomegaly=CARDIOMEGALY in findings, fracture=FRACTURE in findings)
    chest.draw_anatomy()
    draw = {
        AORTIC_CALCIFICATION: chest.aortic_calcification,
        CARDIOMEGALY: chest.cardiomegaly,
        FRACTURE: chest.fracture_box,
        MASS: chest.mass,
        NODULE: chest.nodule,
        PLEURAL_EFFUSION: chest.effusion,
        PNEUMONIA: chest.pneumonia,
        PNEUMOTHORAX: chest.pneumothorax,
        TUBERCULOSIS: chest.tuberculosis,
    }
    # effusion and pneumothorax first, so that focal lesions are placed where they stay visible
    order = sorted(findings, key=lambda c: c not in (PLEURAL_EFFUSION, PNEUMOTHORAX))
    boxes = np.array([draw[c]() for c in order], np.float32).reshape(-1, 4)
    boxes = np.clip(boxes, 0, size)
    image = chest.render(bit_depth)
    return Sample(image, boxes, np.array(order, np.int64), tuple(findings))


def write_coco(
    out_dir: str | Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    *,
    splits: Mapping[str, float] | None = None,
    **options,
) -> dict[str, Path]:
    """Write ``n`` synthetic images as PNGs and COCO JSON files in the layout of ``nih-cxr``.

    ``out_dir/images/synth_00000.png ...`` and one ``out_dir/annotations/<split>.json`` per split
    (``file_name`` relative to ``out_dir/images``; read back with
    ``records_from_coco(json_path, image_root=out_dir / "images")``). Every image carries
    ``image_labels`` (class names, or ``["No Finding"]``) and a ``patient_id``; boxes are COCO
    [x, y, w, h] in pixels with category ids 1..9 = ``PAPER_CLASSES``.

    Args:
        out_dir: output folder (created).
        n, size, seed, options: as :func:`generate`.
        splits: split name -> fraction of the images, in order (default ``{"synthetic": 1.0}``);
            fractions are normalised, the last split takes the rounding remainder.

    Returns:
        split name -> path of its JSON file.
    """
    splits = dict(splits or {"synthetic": 1.0})
    if not splits or any(f < 0 for f in splits.values()) or sum(splits.values()) <= 0:
        raise ValueError(f"splits must map names to fractions >= 0 with a positive sum, got {splits}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "thoracic_finding"} for i, name in enumerate(PAPER_CLASSES)]
    total = sum(splits.values())
    bounds = np.round(np.cumsum([0.0, *splits.values()]) / total * n).astype(int)
    samples = generate(n, size, seed, **options)
    paths, annotation_id = {}, 1
    for (name, _), start, stop in zip(splits.items(), bounds[:-1], bounds[1:]):
        images, annotations = [], []
        for i in range(start, stop):
            sample = samples[i]
            file_name = f"synth_{i:05d}.png"
            Image.fromarray(sample.image).save(out_dir / "images" / file_name)
            labels = [PAPER_CLASSES[c] for c in sample.image_labels] or [NO_FINDING]
            images.append(
                {"id": i + 1, "file_name": file_name, "width": size, "height": size, "patient_id": i + 1, "image_labels": labels}
            )
            for (x1, y1, x2, y2), c in zip(sample.boxes.tolist(), sample.labels.tolist()):
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": annotation_id,
                        "image_id": i + 1,
                        "category_id": c + 1,
                        "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
                        "area": round(w * h, 2),
                        "iscrowd": 0,
                    }
                )
                annotation_id += 1
        coco = {
            "info": {"description": f"synthetic chest X-rays, oxnet.data.synthetic, seed {seed}, split {name}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        paths[name] = out_dir / "annotations" / f"{name}.json"
        paths[name].write_text(json.dumps(coco), encoding="utf-8")
    return paths


def contact_sheet(samples: Sequence[Sample], path: str | Path, *, columns: int = 4) -> Path:
    """Save a grid of ``samples`` with their boxes and class names drawn (one colour per class) as PNG."""
    if not samples:
        raise ValueError("no samples to draw")
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (255, 160, 200)]  # fmt: skip
    size = samples[0].image.shape[0]
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * size, rows * size))
    font = ImageFont.load_default(size=max(9, size // 22))
    for i, sample in enumerate(samples):
        image = sample.image if sample.image.dtype == np.uint8 else (sample.image >> 8).astype(np.uint8)
        tile = Image.fromarray(image).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for box, c in zip(sample.boxes.tolist(), sample.labels.tolist()):
            draw.rectangle(box, outline=palette[c], width=max(1, size // 256))
            draw.text((box[0] + 2, box[1] + 1), PAPER_CLASSES[c], fill=palette[c], font=font)
        if not len(sample.labels):
            draw.text((4, 2), NO_FINDING, fill=(255, 255, 255), font=font)
        sheet.paste(tile, ((i % columns) * size, (i // columns) * size))
    sheet.save(path)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m oxnet.data.synthetic --contact-sheet out.png`` or ``--write-coco DIR``."""
    parser = argparse.ArgumentParser(prog="python -m oxnet.data.synthetic", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--contact-sheet", metavar="PNG", help="save a grid of samples with boxes and class names")
    action.add_argument("--write-coco", metavar="DIR", help="write DIR/images/*.png and DIR/annotations/*.json")
    parser.add_argument("-n", type=int, default=None, help="number of images (default 16 for a sheet, 300 for COCO)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default="train=0.7,val=0.15,test=0.15", help="for --write-coco: name=fraction,...")
    args = parser.parse_args(argv)
    if args.contact_sheet:
        path = contact_sheet(generate(args.n or 16, args.size, args.seed), args.contact_sheet)
        print(path)
    else:
        splits = {name: float(f) for name, f in (item.split("=") for item in args.splits.split(","))}
        for name, path in write_coco(args.write_coco, args.n or 300, args.size, args.seed, splits=splits).items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
