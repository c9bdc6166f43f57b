"""Strict readers behind :func:`sparseflex.data.mesh.load_mesh`: triangle soups from OBJ, PLY, STL, OFF and GLB/GLTF.

OBJ, PLY, STL and OFF are parsed here, vectorised with numpy, and every count and index is checked against what the
file really holds: a truncated, padded or inconsistent file raises :class:`InputError` instead of loading wrong
geometry. GLB/GLTF go through trimesh after their container, buffers, accessors and node tree have been checked.

Faces come out in the order trimesh's loaders gave them (quads split as ``(0, 1, 2), (2, 3, 0)``, OBJ faces grouped
by material), so meshes loaded before these readers existed load to the same arrays and seeded results reproduce.
"""

from __future__ import annotations

import json
import re
import struct
import warnings
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from ..errors import InputError


class FormatError(Exception):
    """A problem in a file's content; :func:`read_triangles` prefixes the path and re-raises it as InputError."""


def read_triangles(p: Path, ext: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [V, 3] float64, faces [F, 3] int64)`` of the file, faces in ``[0, V)``; InputError otherwise."""
    try:
        if ext in (".glb", ".gltf"):
            vertices, faces = _read_gltf(p, ext == ".glb")
        else:
            vertices, faces = _READERS[ext](p.read_bytes())
    except FormatError as exc:
        raise InputError(f"{p}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    # every reader checks its own indices with a better message; this guards the contract
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise InputError(f"{p}: a face index is outside the {len(vertices)} vertices")
    return vertices, faces


# -- shared helpers ---------------------------------------------------------------------------------------------------

#: The bytes ``bytes.split()`` and numpy's text parser treat as whitespace.
_WS = np.zeros(256, dtype=bool)
_WS[list(b" \t\n\r\x0b\x0c")] = True
#: What numpy's text parser reads as one number (only used to point at the token it could not read).
_NUMBER = {np.float64: re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?i:nan|inf(?:inity)?)"),
           np.int64: re.compile(rb"[+-]?\d+")}


class _Lines:
    """A text file's bytes with, for every line, its start, its first non-blank byte (past any indentation) and its
    end (the \\n): per-line work in numpy."""

    def __init__(self, data: bytes):
        if not data.endswith(b"\n"):
            data += b"\n"
        self.data = data
        self.buf = np.frombuffer(data, dtype=np.uint8)
        self.ends = np.flatnonzero(self.buf == 10)
        self.starts = np.concatenate([[0], self.ends[:-1] + 1])
        self.first = self.starts.copy()
        todo = np.flatnonzero(_WS[self.buf[self.first]] & (self.first < self.ends))
        for _ in range(64):  # indentation is short: step the indented lines on a byte at a time
            if not len(todo):
                break
            self.first[todo] += 1
            todo = todo[_WS[self.buf[self.first[todo]]] & (self.first[todo] < self.ends[todo])]
        for i in todo:  # the rare deeper ones
            line = data[self.first[i]:self.ends[i]]
            self.first[i] += len(line) - len(line.lstrip())

    def head(self, width: int) -> np.ndarray:
        """``[lines, width]``: each line's first ``width`` bytes from its first non-blank one (a short line continues
        with its \\n and what follows)."""
        return self.buf[np.minimum(self.first[:, None] + np.arange(width), len(self.buf) - 1)]

    def select(self, rows: np.ndarray, blank: int = 0) -> bytes:
        """Lines ``rows`` (ascending) concatenated (each still ends in \\n), the first ``blank`` non-blank bytes of
        each (its keyword) made spaces."""
        keep = np.zeros(len(self.starts), dtype=bool)
        keep[rows] = True
        lengths = self.ends - self.starts + 1
        out = self.buf[np.repeat(keep, lengths)]
        at = np.cumsum(lengths[rows]) - lengths[rows] + (self.first - self.starts)[rows]
        for k in range(blank):
            out[at + k] = ord(" ")
        return out.tobytes()


def _word(head: np.ndarray, word: bytes) -> np.ndarray:
    """Which lines (rows of :meth:`_Lines.head`) start with the whole word ``word``."""
    n = len(word)
    return (head[:, :n] == np.frombuffer(word, dtype=np.uint8)).all(axis=1) & _WS[head[:, n]]


def _tokens_per_line(blob: bytes) -> np.ndarray:
    """Whitespace-separated token count of every line of ``blob`` (which ends in \\n)."""
    b = np.frombuffer(blob, dtype=np.uint8)
    ws = _WS[b]
    start = ~ws
    start[1:] &= ws[:-1]
    return np.diff(np.searchsorted(np.flatnonzero(start), np.flatnonzero(b == 10)), prepend=0)


def _numbers(blob: bytes, counts: np.ndarray, lines: np.ndarray, dtype, what: str) -> np.ndarray:
    """Parse exactly ``counts.sum()`` numbers from ``blob``; ``counts``/``lines``: tokens and file line number of
    each of its lines, to name the culprit."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=dtype)
    values = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # older numpy stops at bad data with a DeprecationWarning, newer raises
        try:
            values = np.fromstring(blob, dtype=dtype, sep=" ")
        except (ValueError, DeprecationWarning):
            pass
    if values is not None and len(values) == total:
        return values
    # slow path, only to word the error: find the first token that is not a number of that kind
    for line, text in zip(lines, blob.split(b"\n")):
        for token in text.split():
            if not _NUMBER[dtype].fullmatch(token):
                kind = "an integer" if dtype is np.int64 else "a number"
                raise FormatError(f"line {line}: {what} {_show(token)} is not {kind}")
    raise FormatError(f"{what}s are not all numbers")


def _show(token: bytes) -> str:
    return repr(token[:24].decode("latin-1"))


def _triangulate(counts: np.ndarray, flat: np.ndarray, grouped: bool = True) -> np.ndarray:
    """Fan-triangulate polygons given by their vertex counts (>= 3) and concatenated indices.

    Quads become ``(0, 1, 2), (2, 3, 0)``. ``grouped``: trimesh's order (every triangle, then every quad's first
    half, then every quad's second half, then the fans of larger polygons); otherwise polygon by polygon.
    """
    if len(counts) == 0 or (counts == 3).all():
        return flat.reshape(-1, 3)
    ntri = counts - 2
    poly = np.repeat(np.arange(len(counts)), ntri)
    j = np.arange(len(poly)) - (np.cumsum(ntri) - ntri)[poly]  # triangle number within its polygon
    corners = np.stack([np.zeros_like(j), j + 1, j + 2], axis=1)
    n = counts[poly]
    corners[(n == 4) & (j == 1)] = (2, 3, 0)
    tris = flat[(np.cumsum(counts) - counts)[poly][:, None] + corners]
    if grouped:
        key = np.where(n == 3, 0, np.where(n == 4, 1 + j, 3))
        tris = tris[np.argsort(key, kind="stable")]
    return tris


def _check_range(idx: np.ndarray, num_vertices: int, where) -> None:
    """Raise unless every index is in ``[0, num_vertices)``; ``where(i)`` words the position of entry ``i``."""
    bad = np.flatnonzero((idx < 0) | (idx >= num_vertices))
    if len(bad):
        i = int(bad[0])
        if idx[i] < 0:
            raise FormatError(f"{where(i)}: negative vertex index {int(idx[i])}")
        raise FormatError(f"{where(i)}: vertex index {int(idx[i])} but only {_plural(num_vertices, 'vertex')}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {'vertices' if word == 'vertex' else word + 's'}"


# -- OBJ --------------------------------------------------------------------------------------------------------------

def read_obj(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Wavefront OBJ: ``v`` and ``f`` lines (1-based, negative = relative to the vertices defined so far).

    Any byte encoding works (only ASCII keywords and numbers are read; names, comments and materials are ignored).
    OBJ has no counts, so a cut file is caught when it leaves a malformed line or a face index past the vertices.
    """
    if b"\\\n" in data or b"\\\r\n" in data:
        data = re.sub(rb"\\\r?\n", b" ", data)  # line continuation
    text = _Lines(data)
    head = text.head(7)
    is_v, is_f = _word(head, b"v"), _word(head, b"f")
    v_rows, f_rows = np.flatnonzero(is_v), np.flatnonzero(is_f)
    num_v = len(v_rows)

    blob = text.select(v_rows, blank=1)
    counts = _tokens_per_line(blob)
    if num_v and counts.min() < 3:
        i = int(np.argmax(counts < 3))
        raise FormatError(f"line {v_rows[i] + 1}: a vertex needs 3 coordinates, found {counts[i]}")
    values = _numbers(blob, counts, v_rows + 1, np.float64, "vertex coordinate")
    if num_v and (counts == 3).all():
        vertices = values.reshape(-1, 3)
    else:  # 4th (w) or colour columns: keep x, y, z
        vertices = values[(np.cumsum(counts) - counts)[:, None] + np.arange(3)]

    blob = text.select(f_rows, blank=1)
    counts = _tokens_per_line(blob)
    if len(f_rows) and counts.min() < 3:
        i = int(np.argmax(counts < 3))
        raise FormatError(f"line {f_rows[i] + 1}: a face needs 3 vertices, found {counts[i]}")
    raw = _obj_vertex_refs(blob, counts, f_rows)
    before = np.cumsum(is_v)[f_rows]  # vertices defined above each face line: the base of relative indices
    base = np.repeat(before, counts)
    idx = np.where(raw > 0, raw - 1, base + raw)
    bad = np.flatnonzero((raw == 0) | (raw > num_v) | (idx < 0))
    if len(bad):
        i = int(bad[0])
        line = f_rows[np.searchsorted(np.cumsum(counts), i, side="right")] + 1
        if raw[i] == 0:
            raise FormatError(f"line {line}: face index 0 (OBJ indices start at 1)")
        if raw[i] > 0:
            raise FormatError(f"line {line}: face index {raw[i]} is past the last vertex (the file has {num_v})")
        raise FormatError(f"line {line}: relative face index {raw[i]} points before the first vertex "
                          f"({base[i]} defined above it)")
    return vertices, _obj_faces(text, np.flatnonzero(_word(head, b"usemtl")), f_rows, counts, idx, blob)


def _obj_vertex_refs(blob: bytes, counts: np.ndarray, f_rows: np.ndarray) -> np.ndarray:
    """The vertex field of every ``v[/vt][/vn]`` face entry, in order, as written (1-based or negative)."""
    junk = blob.translate(None, b"0123456789+-/ \t\r\n\x0b\x0c")
    if junk:
        bad = next(i for i, line in enumerate(blob.split(b"\n")) if line.translate(None, b"0123456789+-/ \t\r\x0b\x0c"))
        raise FormatError(f"line {f_rows[bad] + 1}: face entries must be integers like 7, 7/2 or 7//3")
    if b"/" not in blob:
        return _numbers(blob, counts, f_rows + 1, np.int64, "face index")
    # parse every field, then keep the first of each entry (a field preceded by whitespace, not by '/')
    b = np.frombuffer(blob, dtype=np.uint8)
    slash = b == ord("/")
    sep = _WS[b] | slash
    prev_ws = np.concatenate([[True], _WS[b][:-1]])
    prev_sep = np.concatenate([[True], sep[:-1]])
    field_start = ~sep & prev_sep
    first = (~sep & prev_ws)[field_start]
    fields = np.diff(np.cumsum(field_start)[b == 10], prepend=0)
    values = _numbers(blob.replace(b"/", b" "), fields, f_rows + 1, np.int64, "face index")
    if int(first.sum()) != int(counts.sum()):
        line = f_rows[np.argmax(np.diff(np.cumsum(~sep & prev_ws)[b == 10], prepend=0) != counts)] + 1
        raise FormatError(f"line {line}: a face entry has no vertex index")
    return values[first]


def _obj_faces(text: _Lines, u_rows, f_rows, counts, idx, blob) -> np.ndarray:
    """Triangles grouped by material as trimesh's OBJ loader grouped them (see the module docstring)."""
    ids: dict[bytes, int] = {}
    u_ids = np.array([ids.setdefault(text.data[s + 6:e].strip(), len(ids))
                      for s, e in zip(text.first[u_rows], text.ends[u_rows])], dtype=np.int64)
    last = np.searchsorted(u_rows, f_rows) - 1  # the usemtl line above each face, -1: none
    group = np.where(last >= 0, u_ids[np.maximum(last, 0)] if len(u_ids) else -1, -1)
    labels, first = np.unique(group, return_index=True)
    order = labels[np.argsort(first)][::-1]  # trimesh popped its groups from the end
    fields = None
    parts = []
    for g in order:
        sel = group == g if len(order) > 1 else slice(None)
        c = counts[sel]
        f = idx[np.repeat(group == g, counts)] if len(order) > 1 else idx
        uniform = bool(len(c)) and bool((c == c[0]).all())
        if uniform and c[0] == 4:  # trimesh split quads in two blocks only when every line had the same layout
            if fields is None:
                fields = _tokens_per_line(blob.replace(b"/", b" "))
            uniform = bool((fields[sel] == fields[sel][0]).all())
        parts.append(_triangulate(c, f, grouped=uniform))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


# -- OFF --------------------------------------------------------------------------------------------------------------

def read_off(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """OFF (and COFF/NOFF/STOFF): ``OFF``, ``V F E``, then V vertex lines and F face lines ``n i1 .. in [colour]``,
    exactly: missing or extra lines are errors."""
    if b"#" in data:
        data = re.sub(rb"#[^\n]*", b"", data)
    text = _Lines(data)
    counts = _tokens_per_line(text.data)
    rows = np.flatnonzero(counts)
    if not len(rows):
        raise FormatError("cannot read as OFF (no header)")
    head = text.data[text.starts[rows[0]]:text.ends[rows[0]]].split()
    if not re.fullmatch(rb"(?:ST)?C?N?OFF", head[0]):
        if re.fullmatch(rb"(?:ST)?C?N?(?:4|n)OFF", head[0]):
            raise FormatError(f"{head[0].decode()} (vertices in other than 3 dimensions) is not supported")
        raise FormatError(f"cannot read as OFF (first word {_show(head[0])}, not OFF)")
    rows = rows[1:]
    if len(head) == 1:  # counts on their own line
        if not len(rows):
            raise FormatError("no vertex/face count line after OFF")
        head += text.data[text.starts[rows[0]]:text.ends[rows[0]]].split()
        rows = rows[1:]
    if head[1:2] == [b"BINARY"]:
        raise FormatError("binary OFF is not supported")
    if len(head) not in (3, 4) or not all(re.fullmatch(rb"\d+", h) for h in head[1:]):
        raise FormatError("the count line must be 'vertices faces [edges]' as non-negative integers")
    num_v, num_f = int(head[1]), int(head[2])
    if len(rows) < num_v:
        raise FormatError(f"header declares {_plural(num_v, 'vertex')} but {len(rows)} are present")
    if len(rows) < num_v + num_f:
        raise FormatError(f"header declares {_plural(num_f, 'face')} but {len(rows) - num_v} are present")
    if len(rows) > num_v + num_f:
        raise FormatError(f"{_plural(len(rows) - num_v - num_f, 'line')} after the {_plural(num_f, 'face')} the "
                          f"header declares")

    v_rows, f_rows = rows[:num_v], rows[num_v:]
    c = counts[v_rows]
    if num_v and c.min() < 3:
        i = int(np.argmax(c < 3))
        raise FormatError(f"line {v_rows[i] + 1}: a vertex needs 3 coordinates, found {c[i]}")
    values = _numbers(text.select(v_rows), c, v_rows + 1, np.float64, "vertex coordinate")
    vertices = values[(np.cumsum(c) - c)[:, None] + np.arange(3)]

    c = counts[f_rows]
    values = _numbers(text.select(f_rows), c, f_rows + 1, np.float64, "face value")
    start = np.cumsum(c) - c
    n = values[start]
    bad = np.flatnonzero((n != np.floor(n)) | (n < 3) | (n > c - 1))
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"line {f_rows[i] + 1}: a face line starts with its vertex count (at least 3) and lists "
                          f"that many indices; found count {n[i]:g} and {c[i] - 1} values")
    n = n.astype(np.int64)
    pos = np.repeat(start + 1, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    idx = values[pos]
    frac = np.flatnonzero(idx != np.floor(idx))
    if len(frac):
        raise FormatError(f"face {np.searchsorted(np.cumsum(n), frac[0], side='right')}: "
                          f"vertex index {idx[frac[0]]:g} is not an integer")
    idx = np.clip(idx, -2**62, 2**62).astype(np.int64)
    _check_range(idx, num_v, lambda i: f"line {f_rows[np.searchsorted(np.cumsum(n), i, side='right')] + 1}")
    return vertices, _triangulate(n, idx)


# -- PLY --------------------------------------------------------------------------------------------------------------

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


class _Element:
    def __init__(self, name: str, count: int):
        self.name, self.count = name, count
        self.props: list[tuple[str, str, str | None]] = []  # (name, value type, list count type or None)

    def index(self, name: str) -> int | None:
        return next((i for i, p in enumerate(self.props) if p[0] == name), None)

    def describe(self, n: int) -> str:
        return _plural(n, self.name) if self.name in ("vertex", "face") else f"{n} '{self.name}' elements"


def read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """PLY, ASCII or binary (either endianness): ``vertex`` x, y, z and the ``face`` vertex index lists; element
    counts must match the data exactly (no missing rows, no data left over)."""
    fmt, elements, body = _ply_header(data)
    vertex = next((e for e in elements if e.name == "vertex"), None)
    face = next((e for e in elements if e.name == "face"), None)
    if vertex is None:
        raise FormatError("no vertex element in the header")
    xyz = [vertex.index(a) for a in "xyz"]
    if None in xyz or any(vertex.props[i][2] for i in xyz):
        raise FormatError("the vertex element has no x, y, z properties")
    want = {id(vertex): xyz}
    if face is not None:
        lists = [i for i, p in enumerate(face.props) if p[2]]
        named = [i for i in lists if face.props[i][0] in ("vertex_indices", "vertex_index")]
        if not named and len(lists) != 1:
            raise FormatError("the face element has no vertex_indices list")
        k = (named or lists)[0]
        if face.props[k][1][0] not in "iu":
            raise FormatError("face vertex indices must be stored as integers")
        want[id(face)] = [k]
    read = _ply_ascii if fmt == "ascii" else _ply_binary
    got = read(elements, want, data, body, "<" if fmt == "binary_little_endian" else ">")
    vertices = np.stack(got[id(vertex)], axis=1).astype(np.float64) if vertex.count else np.zeros((0, 3))
    if face is None or face.count == 0:
        return vertices, np.zeros((0, 3), dtype=np.int64)
    n, idx = got[id(face)][0]
    if n.min() < 3:
        i = int(np.argmax(n < 3))
        raise FormatError(f"face {i}: a face needs 3 vertices, found {n[i]}")
    _check_range(idx, vertex.count, lambda i: f"face {np.searchsorted(np.cumsum(n), i, side='right')}")
    return vertices, _triangulate(n, idx)


def _ply_header(data: bytes) -> tuple[str, list[_Element], int]:
    if not re.match(rb"ply\r?\n", data):
        raise FormatError("cannot read as PLY (it does not start with 'ply')")
    end = re.search(rb"(?m)^end_header[ \t]*\r?\n", data)
    if end is None:
        raise FormatError("cannot read as PLY (no end_header line: a truncated header or not PLY)")
    fmt, elements = None, []
    for number, line in enumerate(data[:end.start()].decode("latin-1").splitlines()[1:], start=2):
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) == 3 and words[1] in ("ascii", "binary_little_endian",
                                                                       "binary_big_endian"):
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and re.fullmatch("[0-9]+", words[2]):
            elements.append(_Element(words[1], int(words[2])))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1].props.append((words[2], _PLY_TYPES[words[1]], None))
        elif (words[0] == "property" and elements and len(words) == 5 and words[1] == "list"
              and words[2] in _PLY_TYPES and words[3] in _PLY_TYPES and _PLY_TYPES[words[2]][0] in "iu"):
            elements[-1].props.append((words[4], _PLY_TYPES[words[3]], _PLY_TYPES[words[2]]))
        else:
            raise FormatError(f"header line {number}: cannot read {line.strip()[:60]!r}")
    if fmt is None:
        raise FormatError("the header has no format line")
    empty = next((e for e in elements if e.count and not e.props), None)
    if empty is not None:
        raise FormatError(f"element {empty.name!r} has rows but no properties")
    return fmt, elements, end.end()


def _ply_ascii(elements, want, data, start, _endian=None) -> dict:
    """Read the wanted properties of ASCII rows: ``{id(element): [values of each wanted property]}``, a list
    property as ``(lengths, concatenated indices)``."""
    body = data[start:] if data.endswith(b"\n") else data[start:] + b"\n"
    counts = _tokens_per_line(body)
    values = _numbers(body, counts, np.arange(len(counts)) + data[:start].count(b"\n") + 1, np.float64, "value")

    def count_at(at, _i):
        return values[at]

    out, pos = {}, 0
    for el in elements:
        width = len(el.props)
        lists = [i for i, prop in enumerate(el.props) if prop[2]]
        starts = None
        if el.count * width > len(values) - pos:  # a row holds at least one value per property
            raise FormatError(f"header declares {el.describe(el.count)} but {'at most ' if lists else ''}"
                              f"{(len(values) - pos) // max(width, 1)} are present")
        if len(lists) <= 1 and el.count:
            # rows of equal length (no list, or one list as long in every row as in the first): no walk needed
            n0 = values[pos + lists[0]] if lists else 0
            row = width + int(n0) if 0 <= n0 <= len(values) and n0 == int(n0) else -1
            if row > 0 and pos + el.count * row <= len(values) and (
                    not lists or (values[pos + lists[0]:pos + el.count * row:row] == n0).all()):
                shift = np.where(np.arange(width) > (lists[0] if lists else width), int(n0), 0)
                starts = pos + np.arange(el.count)[:, None] * row + np.arange(width) + shift
                pos += el.count * row
        if starts is None:
            starts = np.empty((el.count, width), dtype=np.int64)
            pos = _walk_rows(el, starts, pos, len(values), [(1, 1 if p[2] else 0) for p in el.props], count_at)
        got = []
        for i in want.get(id(el), []):
            if not el.props[i][2]:
                got.append(_as_declared(values[starts[:, i]], el.props[i][1], el.props[i][0]))
                continue
            n = values[starts[:, i]].astype(np.int64)  # whole numbers: checked by the walk or the equal-rows test
            idx = values[_ragged(starts[:, i] + 1, n, 1)]
            if (idx != np.floor(idx)).any():
                raise FormatError(f"a {el.name} index is not an integer")
            got.append((n, np.clip(idx, -2**62, 2**62).astype(np.int64)))
        out[id(el)] = got
    if pos != len(values):
        raise FormatError(f"{len(values) - pos} values after the last element (the header's counts do not cover "
                          f"the data)")
    return out


def _as_declared(values: np.ndarray, vtype: str, name: str) -> np.ndarray:
    """ASCII values stored as their declared type (float32 rounding matters to which vertices weld)."""
    if vtype[0] == "f":
        return values.astype(vtype)
    info = np.iinfo(vtype)
    if ((values != np.floor(values)) | (values < info.min) | (values > info.max)).any():
        raise FormatError(f"a value of property {name!r} does not fit its integer type")
    return values


def _ragged(starts: np.ndarray, n: np.ndarray, step: int) -> np.ndarray:
    """Positions of the items of lists starting at ``starts`` with ``n`` items ``step`` apart, concatenated."""
    return np.repeat(starts, n) + step * (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))


def _walk_rows(el, starts, pos, end, sizes, count_at) -> int:
    """Fill ``starts`` (where each property of each row begins) row by row, for rows of different lengths;
    ``sizes[i]``: (size of a value or list item, size of the list's length, 0 for a scalar). Returns the end."""
    for r in range(el.count):
        for i, (item, head) in enumerate(sizes):
            starts[r, i] = pos
            if not head:
                pos += item
                continue
            if pos + head > end:
                raise FormatError(f"header declares {el.describe(el.count)} but {r} are present")
            n = count_at(pos, i)
            if not 0 <= n <= end or n != int(n):  # NaN and infinity fail the first test
                raise FormatError(f"{el.name} {r}: list length {n:g} is not a count")
            pos += head + int(n) * item
        if pos > end:
            raise FormatError(f"header declares {el.describe(el.count)} but {r} are present")
    return pos


_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I"}


def _ply_binary(elements, want, data, pos, endian) -> dict:
    """As :func:`_ply_ascii`, for binary rows."""
    buf = np.frombuffer(data, dtype=np.uint8)

    def size(t):
        return np.dtype(t).itemsize

    out = {}
    for el in elements:
        lists = [i for i, prop in enumerate(el.props) if prop[2]]
        remaining = len(data) - pos
        least = sum(size(prop[2] or prop[1]) for prop in el.props)  # a row's size with empty lists
        if el.count * least > remaining:
            raise FormatError(f"header declares {el.describe(el.count)} but {'at most ' if lists else ''}"
                              f"{remaining // max(least, 1)} are present")
        # rows as long as the first one (always so without lists) form one structured array: no walk needed
        fields, at = [], pos
        for i, (_, vtype, ctype) in enumerate(el.props):
            if not ctype:
                fields.append((f"p{i}", endian + vtype))
                at += size(vtype)
                continue
            if at + size(ctype) > len(data):
                fields = None
                break
            n = struct.unpack_from(endian + _STRUCT[ctype], data, at)[0] if el.count else 0
            at += size(ctype) + n * size(vtype)
            if n < 0 or at > len(data):
                fields = None
                break
            fields += [(f"n{i}", endian + ctype), (f"p{i}", endian + vtype, (n,))]
        rows = None
        if fields is not None and el.count * (at - pos) <= remaining:
            rows = np.frombuffer(data, dtype=np.dtype(fields), count=el.count, offset=pos)
            if el.count and all((rows[f"n{i}"] == rows[f"n{i}"][0]).all() for i in lists):
                out[id(el)] = [rows[f"p{i}"] if not el.props[i][2] else
                               (rows[f"n{i}"].astype(np.int64), rows[f"p{i}"].reshape(-1).astype(np.int64))
                               for i in want.get(id(el), [])]
                pos += el.count * (at - pos)
                continue
        starts = np.empty((el.count, len(el.props)), dtype=np.int64)
        formats = [endian + _STRUCT[ctype] if ctype else None for _, _, ctype in el.props]
        pos = _walk_rows(el, starts, pos, len(data), [(size(p[1]), size(p[2]) if p[2] else 0) for p in el.props],
                         lambda at, i: struct.unpack_from(formats[i], data, at)[0])
        got = []
        for i in want.get(id(el), []):
            _, vtype, ctype = el.props[i]
            if not ctype:
                got.append(_gather_binary(buf, starts[:, i], endian + vtype))
                continue
            n = _gather_binary(buf, starts[:, i], endian + ctype).astype(np.int64)
            items = _gather_binary(buf, _ragged(starts[:, i] + size(ctype), n, size(vtype)), endian + vtype)
            got.append((n, items.astype(np.int64)))
        out[id(el)] = got
    trailing = data[pos:]
    if trailing.strip():  # a final newline some writers add is harmless; real data is not
        raise FormatError(f"{len(trailing)} bytes after the last element (the header's counts do not cover the data)")
    return out


def _gather_binary(buf: np.ndarray, at: np.ndarray, dtype: str) -> np.ndarray:
    """Values of ``dtype`` starting at byte offsets ``at``."""
    size = np.dtype(dtype).itemsize
    return buf[at[:, None] + np.arange(size)].reshape(-1).view(dtype)


# -- STL --------------------------------------------------------------------------------------------------------------

#: Bytes that do not occur in text; binary STL data has them, ASCII STL does not.
_CONTROL = bytes(range(9)) + bytes(range(14, 32)) + b"\x7f"
_STL_ROW = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attributes", "<u2")])


def read_stl(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Binary STL (the size must be exactly 84 + 50 x the header's triangle count) or ASCII STL (``solid``,
    ``facet`` / ``outer loop`` / 3 ``vertex`` / ``endloop`` / ``endfacet``, ``endsolid``: complete)."""
    count = struct.unpack_from("<I", data, 80)[0] if len(data) >= 84 else None
    if count is not None and 84 + 50 * count == len(data):
        rows = np.frombuffer(data, dtype=_STL_ROW, count=count, offset=84)
        return rows["vertices"].reshape(-1, 3), np.arange(3 * count, dtype=np.int64).reshape(-1, 3)
    head = data[:1024]
    if head.lstrip()[:5].lower() == b"solid" and len(head.translate(None, _CONTROL)) == len(head):
        return _read_stl_ascii(data)
    if count is None:
        raise FormatError(f"cannot read as STL ({len(data)} bytes: not ASCII STL and too short for binary STL)")
    raise FormatError(f"binary STL header declares {_plural(count, 'triangle')} ({84 + 50 * count} bytes) but the "
                      f"file has {len(data)} bytes")


#: ASCII STL line keywords and the letter each one becomes in the sequence checked by a regular expression.
_STL_KEYWORDS = {b"solid": "s", b"facet": "f", b"outer": "o", b"vertex": "v", b"endloop": "l", b"endfacet": "e",
                 b"endsolid": "E"}


def _read_stl_ascii(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    text = _Lines(data.lower())
    head = text.head(9)
    codes = np.full(len(text.starts), ord("?"), dtype=np.uint8)
    codes[text.first == text.ends] = ord(" ")
    for word, letter in _STL_KEYWORDS.items():
        maybe = np.flatnonzero((head[:, 0] == word[0]) & (head[:, 3] == word[3]))  # cheap pre-selection
        codes[maybe[_word(head[maybe], word)]] = ord(letter)
    rows = np.flatnonzero(codes != ord(" "))
    seq = codes[rows].tobytes()
    if not re.fullmatch(rb"(?:s(?:fovvvle)*E)+", seq):
        # the longest prefix that is still valid: complete solids, then an open one with a partial facet
        at = re.match(rb"(?:s(?:fovvvle)*E)*(?:s(?:fovvvle)*(?:f(?:o(?:v(?:v(?:vl?)?)?)?)?)?)?", seq).end()
        if at >= len(seq):
            raise FormatError("ASCII STL ends inside a solid (no 'endsolid': truncated?)")
        line = rows[at]
        word = text.data[text.first[line]:text.ends[line]].split()[:1] or [b""]
        raise FormatError(f"line {line + 1}: unexpected {_show(word[0])} in ASCII STL")
    v_rows = rows[np.frombuffer(seq, dtype=np.uint8) == ord("v")]
    blob = text.select(v_rows, blank=6)
    counts = _tokens_per_line(blob)
    if len(v_rows) and (counts != 3).any():
        i = int(np.argmax(counts != 3))
        raise FormatError(f"line {v_rows[i] + 1}: a vertex needs 3 coordinates, found {counts[i]}")
    vertices = _numbers(blob, counts, v_rows + 1, np.float64, "vertex coordinate").reshape(-1, 3)
    return vertices, np.arange(len(vertices), dtype=np.int64).reshape(-1, 3)


# -- GLB / GLTF -------------------------------------------------------------------------------------------------------

_GLTF_COMPONENT = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_GLTF_TYPE = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}


def _read_gltf(p: Path, glb: bool) -> tuple[np.ndarray, np.ndarray]:
    """Check the container and the JSON's buffers, views, accessors and node tree, then let trimesh build the scene;
    every geometry's faces are checked against its vertices."""
    import trimesh

    data = p.read_bytes()
    doc, bin_chunk = _glb_container(data) if glb else (_gltf_json(data), None)
    _check_gltf(doc, p, len(data), bin_chunk)
    try:
        scene = trimesh.load(p, force="scene", process=False)
    except Exception as exc:  # trimesh raises anything from ValueError to struct.error on bad bytes
        detail = f"no {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())[:160] or type(exc).__name__
        raise FormatError(f"cannot read as {'GLB' if glb else 'GLTF'} ({detail})") from None
    vertices, faces, offset = [], [], 0
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geom = scene.geometry.get(name)
        if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
            continue  # point clouds, paths
        f = np.asarray(geom.faces, dtype=np.int64)
        _check_range(f.reshape(-1), len(geom.vertices), lambda i, _n=name: f"mesh {_n!r}")
        v = trimesh.transformations.transform_points(np.asarray(geom.vertices, dtype=np.float64), transform)
        vertices.append(v)
        faces.append(f + offset)
        offset += len(v)
    if not faces:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(vertices), np.concatenate(faces)


def _glb_container(data: bytes) -> tuple[dict, bytes | None]:
    """The JSON document and the BIN chunk of a GLB, after checking the header and chunk lengths against the size."""
    if len(data) < 20:
        raise FormatError(f"cannot read as GLB ({len(data)} bytes: too short)")
    magic, version, length = struct.unpack_from("<4sII", data)
    if magic != b"glTF":
        raise FormatError("cannot read as GLB (no glTF magic number)")
    if version != 2:
        raise FormatError(f"GLB version {version} is not supported (only 2)")
    if length != len(data):
        raise FormatError(f"GLB header declares {length} bytes but the file has {len(data)}")
    chunks, pos = [], 12
    while pos < len(data):
        if pos + 8 > len(data):
            raise FormatError(f"GLB chunk header cut off at byte {pos}")
        size, kind = struct.unpack_from("<II", data, pos)
        if pos + 8 + size > len(data):
            raise FormatError(f"GLB chunk at byte {pos} declares {size} bytes but {len(data) - pos - 8} remain")
        chunks.append((kind, data[pos + 8:pos + 8 + size]))
        pos += 8 + size
    if not chunks or chunks[0][0] != 0x4E4F534A:
        raise FormatError("GLB does not start with a JSON chunk")
    bin_chunk = next((c for k, c in chunks[1:] if k == 0x004E4942), None)
    return _gltf_json(chunks[0][1]), bin_chunk


def _gltf_json(raw: bytes) -> dict:
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"cannot read the glTF JSON ({' '.join(str(exc).split())[:100]})") from None
    if not isinstance(doc, dict):
        raise FormatError("glTF JSON is not an object")
    return doc


def _items(doc: dict, key: str) -> list[dict]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise FormatError(f"glTF '{key}' is not a list of objects")
    return items


def _int(obj: dict, key: str, what: str, default=None, low: int = 0, high: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is not int or value < low or (high is not None and value >= high):
        bound = f" below {high}" if high is not None else ""
        raise FormatError(f"{what}: '{key}' must be an integer >= {low}{bound}, not {str(value)[:30]}")
    return value


def _check_gltf(doc: dict, p: Path, file_size: int, bin_chunk: bytes | None) -> None:
    """Buffers as long as declared, views inside buffers, accessors inside views (so no count can make trimesh
    allocate more than the file describes) and the node hierarchy a forest."""
    buffers, views, accessors = _items(doc, "buffers"), _items(doc, "bufferViews"), _items(doc, "accessors")
    nodes, meshes = _items(doc, "nodes"), _items(doc, "meshes")
    sizes = []
    for i, buf in enumerate(buffers):
        declared = _int(buf, "byteLength", f"buffer {i}")
        uri = buf.get("uri")
        if uri is None:
            actual = len(bin_chunk) if i == 0 and bin_chunk is not None else -1
            if actual < 0:
                raise FormatError(f"buffer {i} has no uri and there is no GLB binary chunk for it")
        elif not isinstance(uri, str):
            raise FormatError(f"buffer {i}: uri is not a string")
        elif uri.startswith("data:"):
            meta, _, payload = uri.partition(",")
            if meta.endswith(";base64"):  # the decoded size, without decoding (trimesh decodes it)
                actual = len(payload) * 3 // 4 - payload[-2:].count("=")
            else:
                actual = len(unquote(payload).encode("utf-8"))
        else:
            try:
                actual = (p.parent / unquote(uri)).stat().st_size
            except (OSError, ValueError):  # ValueError: a NUL in the name
                raise FormatError(f"buffer {i}: file {uri[:80]!r} not found") from None
        if actual < declared:
            raise FormatError(f"buffer {i} declares {declared} bytes but holds {actual}")
        sizes.append(declared)
    for i, view in enumerate(views):
        b = _int(view, "buffer", f"bufferView {i}", high=len(buffers))
        offset, length = _int(view, "byteOffset", f"bufferView {i}", 0), _int(view, "byteLength", f"bufferView {i}")
        _int(view, "byteStride", f"bufferView {i}", 4, low=1)
        if offset + length > sizes[b]:
            raise FormatError(f"bufferView {i} spans bytes {offset}..{offset + length} of buffer {b}, which has "
                              f"{sizes[b]}")
    for i, acc in enumerate(accessors):
        what = f"accessor {i}"
        comp, kind = acc.get("componentType"), acc.get("type")
        if type(comp) is not int or comp not in _GLTF_COMPONENT or type(kind) is not str or kind not in _GLTF_TYPE:
            raise FormatError(f"{what}: unknown componentType or type")
        count = _int(acc, "count", what)
        item = _GLTF_COMPONENT[comp] * _GLTF_TYPE[acc["type"]]
        if "bufferView" not in acc:
            if count > file_size:  # zero-filled or compressed data: still bounded by what the file could encode
                raise FormatError(f"{what} declares {count} elements without data, more than the file has bytes")
            continue
        v = _int(acc, "bufferView", what, high=len(views))
        stride = views[v].get("byteStride", item)
        need = _int(acc, "byteOffset", what, 0) + (count - 1) * stride + item if count else 0
        if need > views[v]["byteLength"]:
            raise FormatError(f"{what} declares {count} elements ({need} bytes) but its bufferView holds "
                              f"{views[v]['byteLength']}")
    for i, mesh in enumerate(meshes):
        for prim in _items(mesh, "primitives"):
            attributes = prim.get("attributes", {})
            if not isinstance(attributes, dict):
                raise FormatError(f"mesh {i}: primitive attributes are not an object")
            for key in attributes:
                _int(attributes, key, f"mesh {i} attribute {key}", high=len(accessors))
            if "indices" in prim:
                _int(prim, "indices", f"mesh {i} indices", high=len(accessors))
    parent = [-1] * len(nodes)
    for i, node in enumerate(nodes):
        if "mesh" in node:
            _int(node, "mesh", f"node {i}", high=len(meshes))
        children = node.get("children", [])
        if not isinstance(children, list):
            raise FormatError(f"node {i}: children is not a list")
        for c in children:
            if type(c) is not int or not 0 <= c < len(nodes) or parent[c] != -1 or c == i:
                raise FormatError(f"node {i}: child {str(c)[:20]} is not a node without another parent")
            parent[c] = i
    # with one parent at most per node, a cycle is a walk up that comes back to where it is still walking
    state = [0] * len(nodes)  # 0: not seen, 1: on the current walk, 2: leads to a root
    for i in range(len(nodes)):
        path, j = [], i
        while j != -1 and state[j] == 0:
            state[j] = 1
            path.append(j)
            j = parent[j]
        if j != -1 and state[j] == 1:
            raise FormatError(f"node {j} is its own ancestor (the node hierarchy has a cycle)")
        for k in path:
            state[k] = 2
    for s, scene in enumerate(_items(doc, "scenes")):
        roots = scene.get("nodes", [])
        if not isinstance(roots, list) or not all(type(n) is int and 0 <= n < len(nodes) for n in roots):
            raise FormatError(f"scene {s}: nodes are not node indices")


_READERS = {".obj": read_obj, ".off": read_off, ".ply": read_ply, ".stl": read_stl}
