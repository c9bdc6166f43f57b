"""The error contract of every `sparseflex` command (issue 14).

Bad input gives exactly one stderr line ``error: ...`` and exit status 2: no traceback, no empty output file or
folder left behind, nothing the user gave overwritten without --overwrite.

Most cases are GENERATED from the argument parsers (``build_parser()`` walked recursively), so a new command or flag
is covered as soon as it exists: every numeric option must carry its bounds (a ``sparseflex.cli.common.number``
type) and rejects NaN, infinities and values outside them when the command line is parsed; every ``--device``
rejects devices this machine does not have; every ``-o/--output`` rejects a location under a file or in a folder
that cannot be written, before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from sparseflex.cli import build_parser, main
from sparseflex.errors import InputError, OptionError, check_range

try:
    from sparseflex.cli.common import Number
except ImportError:  # an older sparseflex: the generated cases still run (and fail) against it
    Number = type("Number", (), {})

TETRA = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n"
#: Option destinations naming where a command writes.
OUTPUT_DESTS = ("output", "out_dir", "new")


# -- walking the parsers ----------------------------------------------------------------------------------------------

def _subparsers(parser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def leaf_commands(parser=None, path=()):
    """``(command words, parser)`` of every runnable command, e.g. ``(("data", "prepare"), <parser>)``."""
    parser = parser or build_parser()
    subs = _subparsers(parser)
    if not subs:
        yield path, parser
        return
    seen = set()
    for action in subs:
        for name, sub in action.choices.items():
            if id(sub) not in seen:  # aliases share the parser
                seen.add(id(sub))
                yield from leaf_commands(sub, path + (name,))


def inner_parsers(parser=None, path=()):
    """Every parser that has sub-commands (their own options would not be reached by the generated cases)."""
    parser = parser or build_parser()
    subs = _subparsers(parser)
    if subs:
        yield path, parser
        for action in subs:
            for name, sub in action.choices.items():
                yield from inner_parsers(sub, path + (name,))


def is_numeric(action) -> bool:
    return bool(action.option_strings) and (isinstance(action.type, Number) or action.type in (int, float))


LEAVES = list(leaf_commands())


class Files:
    """Minimal valid inputs: a tetrahedron OBJ, a folder holding it, and the output location (not created)."""

    def __init__(self, root: Path):
        self.root = root
        self.mesh_dir = root / "meshes"
        self.mesh_dir.mkdir()
        self.mesh = self.mesh_dir / "tetra.obj"
        self.mesh.write_text(TETRA)
        self.out = root / "out"


def value_for(action, files: Files, output: Path | None = None) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.dest in OUTPUT_DESTS:
        return str(output if output is not None else files.out)
    if action.dest in ("data", "input_dir"):
        return str(files.mesh_dir)
    return str(files.mesh)  # input meshes, checkpoints, latents: any existing file parses


def minimal_argv(words, parser, files: Files, output: Path | None = None, skip: str | None = None) -> list[str]:
    """The command words, its positionals and its required options (all but ``skip``), with the values above."""
    argv, options = list(words), []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.dest == skip:
            continue
        if not a.option_strings:
            if a.nargs not in ("?", "*"):
                argv.append(value_for(a, files, output))
        elif a.required:
            options += [a.option_strings[0], value_for(a, files, output)]
    return argv + options


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0)
            for p in sorted(root.rglob("*"))}


def assert_one_error_line(code, capsys, *words, paths: Path | None = None) -> str:
    """Exit status 2 and exactly one stderr line ``error: ...`` holding ``words`` (looked for outside the paths
    under ``paths``, whose names come from the test's name); returns the line."""
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][7:].strip(), captured.err
    assert "Traceback" not in captured.err
    text = lines[0].replace(str(paths), "TMP") if paths is not None else lines[0]
    for word in words:
        assert word in text, lines[0]
    return lines[0]


def run_rejected(argv, tmp_path, capsys, *words) -> str:
    """``main(argv)`` must return 2 with one ``error:`` line (containing ``words``) and create nothing."""
    before = snapshot(tmp_path)
    line = assert_one_error_line(main(argv), capsys, *words, paths=tmp_path)
    assert snapshot(tmp_path) == before, "the rejected command created or changed files"
    return line


# -- generated: numeric options ---------------------------------------------------------------------------------------

def _bad_values(action) -> list[str]:
    t = action.type
    if not isinstance(t, Number):  # a bare int / float type: it must at least refuse these
        return ["nan", "inf", "-inf", "-1"]
    values = ["nan", "inf", "-inf"]
    if t.kind is int:
        values.append("1.5")
    if t.low is not None:
        below = t.low if t.low_open else (t.low - 1 if t.kind is int else t.low - 0.5 * max(abs(t.low), 1))
        values.append(str(below))
    if t.high is not None:
        above = t.high if t.high_open else (t.high + 1 if t.kind is int else t.high + 0.5 * max(abs(t.high), 1))
        values.append(str(above))
    return values


NUMERIC_CASES = [pytest.param(words, a.option_strings[-1], value,
                              id=f"{' '.join(words)} {a.option_strings[-1]} {value}")
                 for words, parser in LEAVES for a in parser._actions if is_numeric(a) for value in _bad_values(a)]
NUMERIC_OPTIONS = [pytest.param(words, a, id=f"{' '.join(words)} {a.option_strings[-1]}")
                   for words, parser in LEAVES for a in parser._actions if is_numeric(a)]


def _parser_of(words):
    return dict(LEAVES)[tuple(words)]


def test_the_generated_cases_cover_the_commands():
    commands = {" ".join(words) for words, _ in LEAVES}
    assert {"fit", "convert", "render", "metrics", "data prepare", "data stats", "train", "reconstruct", "encode",
            "decode"} <= commands
    assert len(NUMERIC_OPTIONS) >= 40 and len(NUMERIC_CASES) >= 200


def test_numeric_options_only_on_runnable_commands():
    for words, parser in inner_parsers():
        assert not [a.dest for a in parser._actions if is_numeric(a)], f"sparseflex {' '.join(words)}"


@pytest.mark.parametrize("words,action", NUMERIC_OPTIONS)
def test_numeric_option_declares_its_bounds(words, action):
    """Every numeric option is a `number(kind, low, high, ...)` with at least a lower bound; its default (unless
    None: "not given") lies within them."""
    t = action.type
    assert isinstance(t, Number), f"{action.option_strings[-1]} of `sparseflex {' '.join(words)}` has type {t!r}"
    assert t.low is not None
    if action.default is not None:
        assert t.contains(action.default), (action.option_strings, action.default, t)
        assert t(str(action.default)) == action.default


@pytest.mark.parametrize("words,flag,value", NUMERIC_CASES)
def test_bad_number_is_one_error_line_and_creates_nothing(words, flag, value, tmp_path, capsys):
    files = Files(tmp_path)
    argv = minimal_argv(words, _parser_of(words), files) + [f"{flag}={value}"]  # "-inf" is no flag
    line = run_rejected(argv, tmp_path, capsys, flag)
    assert not files.out.exists()
    assert repr(value) in line or value in line


def test_number_type_and_check_range_reject_non_finite_values():
    from sparseflex.cli.common import number
    t = number(float, 0, 1, high_open=True)
    assert (t.kind, t.low, t.high, t.low_open, t.high_open) == (float, 0, 1, False, True)
    assert t("0") == 0.0 and t(" 0.5 ") == 0.5
    for bad in ("nan", "NaN", "inf", "-Infinity", "1", "-0.1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            t(bad)
    assert number(int, 1)("7") == 7
    with pytest.raises(argparse.ArgumentTypeError):
        number(int, 1)("2.0")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(OptionError, match="finite"):
            check_range("--x", bad)
        with pytest.raises(OptionError, match="finite"):
            check_range("--x", bad, 0, 1)
    assert check_range("--x", 10 ** 400, 0) == 10 ** 400


def test_nan_in_a_training_config_override_is_refused(tmp_path, capsys):
    files = Files(tmp_path)
    argv = ["train", "vae", "--data", str(files.mesh_dir), "-o", str(files.out), "--set", "lr=NaN"]
    run_rejected(argv, tmp_path, capsys, "lr")


def test_argparse_errors_are_one_line_too(tmp_path, capsys):
    files = Files(tmp_path)
    for argv in ([], ["no-such-command"], ["fit", str(files.mesh), "-o", str(files.out), "--no-such-flag"],
                 ["fit", str(files.mesh)], ["render", str(files.mesh), "-o", str(files.out), "--backend", "x"]):
        run_rejected(argv, tmp_path, capsys)


# -- generated: --device ----------------------------------------------------------------------------------------------

def _absent_devices() -> list[str]:
    devices = ["bogus", "meta", "cpu:3", "cuda:x"]
    if torch.cuda.device_count() < 8:
        devices.append("cuda:7")
    if not torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        devices.append("mps")
    return devices


DEVICE_CASES = [pytest.param(words, device, id=f"{' '.join(words)} {device}")
                for words, parser in LEAVES if any(a.dest == "device" for a in parser._actions)
                for device in _absent_devices()]


def test_device_cases_cover_the_commands():
    assert {c.values[0] for c in DEVICE_CASES} >= {("fit",), ("train",), ("reconstruct",), ("encode",), ("decode",)}


@pytest.mark.parametrize("words,device", DEVICE_CASES)
def test_absent_device_is_one_error_line(words, device, tmp_path, capsys):
    files = Files(tmp_path)
    argv = minimal_argv(words, _parser_of(words), files) + ["--device", device]
    run_rejected(argv, tmp_path, capsys, "device", device)


# -- generated: output locations --------------------------------------------------------------------------------------

def _output_name(action) -> str:
    text = action.help or ""
    if "folder" in text or "director" in text:
        return "result"
    return "result.safetensors" if ".safetensors" in text else "result.ply" if ".ply" in text else "result"


OUTPUT_CASES = [pytest.param(words, id=" ".join(words)) for words, parser in LEAVES
                if any(a.dest == "output" for a in parser._actions)]


def _output_action(parser):
    return next(a for a in parser._actions if a.dest == "output")


def _unwritable_folder() -> Path:
    """A real folder this process cannot create anything in, even as root (sysfs refuses new files)."""
    for candidate in ("/sys", "/proc"):
        if os.path.isdir(candidate):
            try:
                with tempfile.TemporaryFile(dir=candidate):
                    pass
            except OSError:
                return Path(candidate)
    pytest.skip("no unwritable folder on this machine")


def test_output_cases_cover_the_commands():
    assert {c.values[0] for c in OUTPUT_CASES} >= {("fit",), ("convert",), ("render",), ("train",),
                                                    ("reconstruct",), ("encode",), ("decode",)}


@pytest.mark.parametrize("words", OUTPUT_CASES)
def test_output_under_a_file_is_one_error_line(words, tmp_path, capsys):
    files = Files(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    parser = _parser_of(words)
    target = blocker / "sub" / _output_name(_output_action(parser))
    run_rejected(minimal_argv(words, parser, files, output=target), tmp_path, capsys, "TMP/blocker is a file",
                 "not a folder")
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("words", OUTPUT_CASES)
def test_output_that_is_a_file_itself(words, tmp_path, capsys):
    """A folder output (fit, render, train) given as an existing file."""
    files = Files(tmp_path)
    parser = _parser_of(words)
    name = _output_name(_output_action(parser))
    if "." in name:
        pytest.skip("a file output: an existing file needs --overwrite, tested elsewhere")
    target = tmp_path / "a-file"
    target.write_text("keep me")
    run_rejected(minimal_argv(words, parser, files, output=target), tmp_path, capsys, "TMP/a-file")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("words", OUTPUT_CASES)
def test_output_in_an_unwritable_folder_is_one_error_line(words, tmp_path, capsys):
    files = Files(tmp_path)
    parser = _parser_of(words)
    folder = _unwritable_folder()
    target = folder / "sparseflex-contract-test" / _output_name(_output_action(parser))
    run_rejected(minimal_argv(words, parser, files, output=target), tmp_path, capsys, "not writable")
    assert not target.parent.exists()


def test_data_prepare_output_locations(tmp_path, capsys):
    files = Files(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for out, words in ((blocker / "sub", ("not a folder",)), (blocker, ("not a folder",)),
                       (_unwritable_folder() / "sparseflex-contract-test", ("not writable",))):
        run_rejected(["data", "prepare", str(files.mesh_dir), str(out), "--workers", "0"], tmp_path, capsys, *words)
    # a folder of the user's that is not a prepared dataset is not filled with ours
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.jsonl").write_text("my own file\n")
    run_rejected(["data", "prepare", str(files.mesh_dir), str(mine), "--workers", "0"], tmp_path, capsys,
                 "not a prepared dataset")
    assert (mine / "manifest.jsonl").read_text() == "my own file\n"
    # a missing input folder creates no output folder
    run_rejected(["data", "prepare", str(tmp_path / "missing"), str(files.out), "--workers", "0"], tmp_path, capsys)


def test_data_stats_sheet_locations(tmp_path, capsys):
    files = Files(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    prepared = _fake_prepared(tmp_path / "prepared", [])
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    for sheet, words in ((blocker / "s.png", ("not a folder",)), (mine, ("--overwrite",)),
                         (tmp_path / "sheet.txt", (".txt",)),
                         (_unwritable_folder() / "sparseflex-contract-test" / "s.png", ("not writable",))):
        run_rejected(["data", "stats", str(prepared), "--sheet", str(sheet)], tmp_path, capsys, *words)
    assert mine.read_bytes() == b"my picture" and not files.out.exists()


def test_backstop_turns_an_output_oserror_into_one_line(tmp_path, capsys, monkeypatch):
    """A location problem the early checks cannot see (here a full disk while writing) is one line, not a
    traceback; the temporary file goes and the folder the command made too."""
    import numpy as np
    files = Files(tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez_compressed", full)
    argv = ["render", str(files.mesh), "-o", str(files.out), "--views", "1", "--size", "8"]
    run_rejected(argv, tmp_path, capsys, "No space left on device")
    files.out.mkdir()  # a folder that existed keeps existing, empty
    assert_one_error_line(main(argv), capsys, "No space left on device")
    assert files.out.is_dir() and not any(files.out.iterdir())


# -- output extensions ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("words,name", [(("encode",), "e.txt"), (("encode",), "e.ply"), (("convert",), "c.txt"),
                                        (("reconstruct",), "r.safetensors"), (("decode",), "d.npz")])
def test_output_extension_a_command_cannot_write_is_refused_before_any_work(words, name, tmp_path, capsys,
                                                                            monkeypatch):
    import importlib
    mesh_module = importlib.import_module("sparseflex.data.mesh")
    pipeline = importlib.import_module("sparseflex.pipelines.reconstruct")  # the package exports a function so named

    def no_work(*args, **kwargs):
        raise AssertionError("the input was read before the output was checked")
    monkeypatch.setattr(mesh_module, "load_mesh", no_work)
    monkeypatch.setattr(pipeline, "load_latent", no_work)
    files = Files(tmp_path)
    parser = _parser_of(words)
    target = tmp_path / name
    run_rejected(minimal_argv(words, parser, files, output=target), tmp_path, capsys, Path(name).suffix)


# -- nothing left behind ----------------------------------------------------------------------------------------------

def test_render_and_fit_leave_no_folder_after_a_bad_input_or_option(tmp_path, capsys):
    files = Files(tmp_path)
    bad = tmp_path / "bad.obj"
    bad.write_text("this is not a mesh\n")
    out = str(files.out)
    for argv in (["render", str(bad), "-o", out, "--views", "1", "--size", "8"],
                 ["render", str(tmp_path / "missing.obj"), "-o", out],
                 ["fit", str(bad), "-o", out, "--quiet"],
                 ["fit", str(files.mesh), "-o", out, "--resolution", "100", "--quiet"],  # not a power of two
                 ["fit", str(files.mesh), "-o", out, "--image-size", "8", "--quiet"],
                 ["convert", str(bad), "-o", str(files.out / "deep" / "c.ply")],
                 ["train", "vae", "--data", str(files.mesh_dir), "-o", out]):  # not a prepared folder
        run_rejected(argv, tmp_path, capsys)


def test_fit_failing_after_making_its_folder_removes_it_and_only_it(tmp_path, capsys, monkeypatch):
    import sparseflex.fit.fitter as fitter

    class Boom:
        def __init__(self, *args, **kwargs):
            raise InputError("boom")
    monkeypatch.setattr(fitter, "Fitter", Boom)
    files = Files(tmp_path)
    argv = ["fit", str(files.mesh), "-o", str(files.out / "new"), "--resolution", "8", "--quiet"]
    run_rejected(argv, tmp_path, capsys, "boom")
    files.out.mkdir()
    argv[3] = str(files.out)  # a folder that existed (empty) is left as it was
    assert_one_error_line(main(argv), capsys, "boom")
    assert files.out.is_dir() and not any(files.out.iterdir())


# -- atomic writes ----------------------------------------------------------------------------------------------------

def _record_replaces(monkeypatch) -> list[tuple[Path, Path]]:
    seen = []
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        seen.append((Path(src), Path(dst)))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_render_writes_through_unique_temporary_files(tmp_path, capsys, monkeypatch):
    """No fixed temporary name: a file of the user's called views.npz.tmp.npz is neither overwritten nor moved."""
    import numpy as np
    files = Files(tmp_path)
    files.out.mkdir()
    mine = files.out / "views.npz.tmp.npz"
    mine.write_bytes(b"mine")
    seen = _record_replaces(monkeypatch)
    assert main(["render", str(files.mesh), "-o", str(files.out), "--views", "1", "--size", "8"]) == 0
    capsys.readouterr()
    assert mine.read_bytes() == b"mine"
    assert sorted(p.name for p in files.out.iterdir()) == ["views.npz", "views.npz.tmp.npz", "views.png"]
    assert np.load(files.out / "views.npz")["mask"].shape == (1, 8, 8)
    moved = {dst.name: src for src, dst in seen}
    for name in ("views.npz", "views.png"):
        assert moved[name].parent == files.out and moved[name].name.startswith(f".{name.split('.')[0]}.")


def test_fit_writes_metrics_json_atomically(tmp_path, capsys, monkeypatch):
    import sparseflex.eval.metrics as metrics
    import sparseflex.fit.report as report
    monkeypatch.setattr(metrics, "mesh_metrics", lambda *a, **k: {"chamfer": 0.0})  # the fit itself is what counts
    monkeypatch.setattr(report, "comparison_image", lambda *a, **k: None)
    monkeypatch.setattr(report, "loss_curve", lambda *a, **k: None)
    seen = _record_replaces(monkeypatch)
    files = Files(tmp_path)
    argv = ["fit", str(files.mesh), "-o", str(files.out), "--resolution", "8", "--iterations", "1",
            "--image-size", "16", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads((files.out / "metrics.json").read_text())["metrics"] == {"chamfer": 0.0}
    src = {dst.name: s for s, dst in seen}["metrics.json"]
    assert src.parent == files.out and src.name.startswith(".metrics.")
    assert not [p.name for p in files.out.iterdir() if p.name.startswith(".")]


# -- data prepare: one run per shard, workers, manifest paths ---------------------------------------------------------

def _fake_prepared(root: Path, records: list[dict]) -> Path:
    """A prepared folder as `data prepare` leaves it, with the given part records (no item files)."""
    from dataclasses import asdict

    from sparseflex.data.prepare import PrepareConfig
    (root / "parts").mkdir(parents=True)
    (root / "items").mkdir()
    (root / "config.json").write_text(json.dumps(asdict(PrepareConfig())))
    (root / "parts" / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.mark.parametrize("second_shard", ["0/1", "1/2"])
def test_two_prepare_runs_of_one_shard_never_share_a_folder(second_shard, tmp_path, capsys, monkeypatch):
    """The first run holds its shard of OUT (a lock) until it ends: a second run of the same shard fails at once with
    one line naming the first run's pid; another shard of the same folder runs side by side."""
    import sparseflex.data.prepare as prepare
    files = Files(tmp_path)
    (files.mesh_dir / "b.obj").write_text(TETRA)
    started, release, calls = threading.Event(), threading.Event(), []

    def fake_item(path, config, seed):
        calls.append(Path(path).name)
        if len(calls) == 1:
            started.set()
            release.wait(30)
        raise InputError("not prepared in this test")
    monkeypatch.setattr(prepare, "prepare_item", fake_item)
    first_shard = "0/1" if second_shard == "0/1" else "0/2"
    codes = []
    first = threading.Thread(target=lambda: codes.append(main(["data", "prepare", str(files.mesh_dir), str(files.out),
                                                               "--workers", "0", "--shard", first_shard])))
    first.start()
    try:
        assert started.wait(30)
        code = main(["data", "prepare", str(files.mesh_dir), str(files.out), "--workers", "0", "--shard", second_shard])
    finally:
        release.set()
        first.join(30)
    assert codes == [0]
    if second_shard == "0/1":
        assert_one_error_line(code, capsys, f"{files.out} is in use by another prepare run (pid {os.getpid()})")
        assert sorted(calls) == ["b.obj", "tetra.obj"]  # the first run's items, not done twice
        lines = (files.out / "parts" / "shard-00000-of-00001.jsonl").read_text().splitlines()
        assert len(lines) == 2
    else:
        assert code == 0 and sorted(calls) == ["b.obj", "tetra.obj"]
    assert files.out.is_dir()


WORKER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from sparseflex.data.workers import run_tasks
import slow_task

if __name__ == "__main__":
    for result in run_tasks(slow_task.task, [sys.argv[1]], workers=1):
        print(result)
"""
SLOW_TASK = """
import time
def task(marker):
    open(marker, "w").close()
    time.sleep(3)
    return 1
"""


def test_worker_of_a_killed_prepare_exits_quietly(tmp_path):
    """`kill -9` of a running prepare (here a script running one slow task in one worker): its orphaned worker
    exits without a word, instead of a BrokenPipeError traceback when it reports its result."""
    (tmp_path / "slow_task.py").write_text(textwrap.dedent(SLOW_TASK))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT))
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the worker never started its task"
        proc.kill()
        out, err = proc.communicate(timeout=120)  # returns once the orphaned worker has closed stderr too
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, (out, err)
    assert "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize("file", ["../outside.npz", "/etc/passwd", "items/../../outside.npz", "..\\outside.npz",
                                  "C:/outside.npz", ""])
def test_manifest_paths_outside_the_folder_are_refused(file, tmp_path):
    from sparseflex.data.dataset import PreparedDataset
    root = tmp_path / "prepared"
    root.mkdir()
    (root / "manifest.jsonl").write_text(json.dumps({"name": "x", "status": "ok", "split": "train", "file": file})
                                         + "\n")
    with pytest.raises(InputError, match="outside the folder|names no file"):
        PreparedDataset(root, "all")
    (root / "manifest.jsonl").write_text(json.dumps({"name": "x", "status": "ok", "split": "train",
                                                     "file": "items/x.npz"}) + "\n")
    assert len(PreparedDataset(root, "all")) == 1


def test_manifest_traversal_is_one_error_line_in_the_commands(tmp_path, capsys):
    (tmp_path / "outside.npz").write_bytes(b"not yours to read")
    record = {"name": "x", "status": "ok", "file": "../outside.npz", "triangles": 4, "vertices": 4, "components": 1,
              "boundary_edges": 0, "nonmanifold_edges": 0, "watertight": True, "voxels": {"8": 1}, "points": 1,
              "bytes": 1, "seconds": 0.1}
    prepared = _fake_prepared(tmp_path / "prepared", [record])
    run_rejected(["data", "stats", str(prepared)], tmp_path, capsys, "outside the folder")
    (prepared / "manifest.jsonl").write_text(json.dumps({**record, "split": "train"}) + "\n")
    run_rejected(["train", "vae", "--data", str(prepared), "-o", str(tmp_path / "run"), "--split", "all"], tmp_path,
                 capsys, "outside the folder")


def test_prepare_removes_the_temporary_files_a_killed_worker_left(tmp_path, capsys, monkeypatch):
    """A worker killed while writing leaves `.NAME.XXXXXXXX.tmp.npz` (sparseflex.io.atomic_path); the next run of
    that shard removes those of its own items, and no one else's."""
    import sparseflex.data.prepare as prepare

    def fake_item(path, config, seed):
        raise InputError("not prepared in this test")
    monkeypatch.setattr(prepare, "prepare_item", fake_item)
    files = Files(tmp_path)
    items = files.out / "items"
    items.mkdir(parents=True)
    left = items / ".tetra.obj.k3j_x9a2.tmp.npz"
    other = items / ".another.obj.k3j_x9a2.tmp.npz"
    left.write_bytes(b"half")
    other.write_bytes(b"someone else's")
    assert main(["data", "prepare", str(files.mesh_dir), str(files.out), "--workers", "0"]) == 0
    capsys.readouterr()
    assert not left.exists() and other.exists()
