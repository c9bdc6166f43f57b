"""Area-weighted uniform sampling of points, with their face normals, on triangle surfaces."""

from __future__ import annotations

import torch

from ..errors import InputError
from .mesh import as_vertices_faces


def sample_surface(mesh, n: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` points uniformly distributed over the surface of a :class:`Mesh` or ``(vertices, faces)``.

    Returns ``points [n, 3]`` (differentiable in the vertices, their dtype and device), unit face ``normals [n, 3]``
    and ``face_index [n]``. The random numbers are drawn on the generator's device (the CPU by default), so a
    seeded generator gives the same samples on every device.
    """
    vertices, faces = as_vertices_faces(mesh)
    tri = vertices[faces]                                                    # [F, 3, 3]
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = cross.detach().double().norm(dim=1)
    if len(faces) == 0 or not float(area.sum()) > 0:
        raise InputError("cannot sample points on a mesh without surface area")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    # inverse-CDF face choice (no category limit, unlike multinomial); right=True never lands on a zero-area face
    cdf = torch.cumsum(area.to(gen_device), 0)
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) * cdf[-1]
    face = torch.searchsorted(cdf, u, right=True).clamp_(max=len(faces) - 1)
    # uniform barycentrics by the square-root map: (1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2)
    r = torch.rand(n, 2, generator=generator, device=gen_device, dtype=torch.float64)
    s = r[:, 0].sqrt()
    bary = torch.stack([1 - s, s * (1 - r[:, 1]), s * r[:, 1]], dim=1)
    face = face.to(faces.device)
    bary = bary.to(device=vertices.device, dtype=vertices.dtype)
    corner = faces[face]
    points = (vertices[corner[:, 0]] * bary[:, :1] + vertices[corner[:, 1]] * bary[:, 1:2]
              + vertices[corner[:, 2]] * bary[:, 2:])
    normals = torch.nn.functional.normalize(cross[face].detach(), dim=1)
    return points, normals, face
