"""Generate examples/demo.obj, the bundled default mesh: a closed torus, an open bowl (a zero-thickness hemisphere), and
a hollow shell with a small sphere inside it, so one fit shows closed, open and interior surfaces together.

    python examples/make_demo.py   # deterministic; writes examples/demo.obj next to this file
"""

from pathlib import Path

import numpy as np
import trimesh


def open_bowl(radius=0.28, rings=24, segments=64):
    """Lower hemisphere without a lid: a single-layer open surface."""
    phi = np.linspace(np.pi / 2, np.pi, rings + 1)[1:]  # from below the rim to the pole
    theta = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    p, t = np.meshgrid(phi, theta, indexing="ij")
    v = np.stack([np.sin(p) * np.cos(t), np.sin(p) * np.sin(t), np.cos(p)], -1).reshape(-1, 3) * radius
    rim = np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], -1) * radius
    v = np.concatenate([rim, v])
    idx = np.arange((rings + 1) * segments).reshape(rings + 1, segments)
    a, b = idx[:-1], idx[1:]
    a1, b1 = np.roll(a, -1, 1), np.roll(b, -1, 1)
    f = np.concatenate([np.stack([a, b, b1], -1).reshape(-1, 3), np.stack([a, b1, a1], -1).reshape(-1, 3)])
    return trimesh.Trimesh(v, f, process=True)


def main():
    torus = trimesh.creation.torus(major_radius=0.3, minor_radius=0.1, major_sections=96, minor_sections=32)
    torus.apply_translation([-0.55, 0, 0])
    bowl = open_bowl()
    bowl.apply_translation([0.15, 0, 0.1])
    shell = trimesh.creation.icosphere(4, radius=0.3)
    inner = trimesh.creation.icosphere(3, radius=0.12)
    shell.apply_translation([0.75, 0, 0])
    inner.apply_translation([0.75, 0, 0])
    demo = trimesh.util.concatenate([torus, bowl, shell, inner])
    out = Path(__file__).with_name("demo.obj")
    demo.export(out)
    print(f"wrote {out}: {len(demo.vertices)} vertices, {len(demo.faces)} faces")


if __name__ == "__main__":
    main()
