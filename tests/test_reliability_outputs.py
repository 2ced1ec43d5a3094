"""Nothing a user made is lost or half-written (issue 9 §4).

- generate and eval write outside the export folder by default (``deltadit-out/<export name>/``);
- a re-export (also ``--force``, also ``--calibrate``) keeps the files in the folder that are not part of the
  export; an export made with other options is never replaced without ``--force``;
- every output file goes through a temporary renamed into place: a SIGKILL between write and rename (a real
  kill of a real process) leaves the previous file; a read-only or full folder is refused before any work;
- two exports on one ``--out`` at once: the second waits for the first's lock (two real processes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, set_args

from deltadit_export import folder_lock, publish
from deltadit_export.export_options import ExportOptions, OptionError
from deltadit_export.exporter import export
from deltadit_export.progress import Progress
from runtime.manifest import MANIFEST_NAME, load_manifest

ROOT = Path(__file__).resolve().parents[1]
QUIET = Progress(quiet=True)
TINY_ARGS = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
             *set_args(TINY_PIXART_SET)]


def tiny(out: Path, **kw) -> ExportOptions:
    return ExportOptions(model="pixart-alpha", resolution=TINY_RESOLUTION, random_weights=True,
                         overrides=dict(TINY_PIXART_SET), out=str(out), **kw)


@pytest.fixture
def own_export(pixart_export, tmp_path) -> Path:
    out = tmp_path / "engines" / "pix"
    shutil.copytree(pixart_export, out)
    return out


def user_files(folder: Path) -> dict[str, bytes]:
    """The user's files this module puts into an export folder, with their contents."""
    return {"grid.png": b"\x89PNG my old grid", "notes/run-3.txt": "what I changed".encode()}


def add_user_files(folder: Path) -> dict[str, bytes]:
    files = user_files(folder)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    os.symlink("grid.png", folder / "latest.png")
    return files


def assert_user_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel
    assert os.readlink(folder / "latest.png") == "grid.png"


# ------------------------------------------------------------------------------------------------ outputs elsewhere


def test_generate_and_eval_write_outside_the_export_by_default():
    from deltadit_export import evaluate, generate

    assert generate.default_out("engines/pixart-digits-16-fp32") == Path("deltadit-out/pixart-digits-16-fp32")
    assert evaluate.default_out(evaluate.DEFAULT_EVAL_ENGINES) == Path("deltadit-out/pixart-digits-16-fp32-eval")
    assert "docs" not in evaluate.default_out(Path("engines/x")).parts  # never the committed docs/quality/


def test_generate_cli_default_out_is_outside_the_engines(shipped_export, tmp_path, monkeypatch):
    from deltadit_export.generate import main

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in shipped_export.iterdir())
    r = CliRunner().invoke(main, ["--engines", str(shipped_export), "--samples", "1", "--steps", "2", "--no-timing",
                                  "--prompt", "a handwritten digit 3", "--threads", "1", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "deltadit-out" / shipped_export.name
    assert (out / "grid.png").is_file() and (out / "compare.png").is_file()
    assert sorted(p.name for p in shipped_export.iterdir()) == before  # nothing written into the export
    assert f"wrote {Path('deltadit-out') / shipped_export.name / 'grid.png'}" in r.output


def test_eval_default_out_leaves_docs_quality_alone(tmp_path, monkeypatch):
    """In a clone the committed docs/quality/quality.json must survive `deltadit eval`: the default --out is
    deltadit-out/<export>/ (checked writable, then the run is cut off before any model work)."""
    from deltadit_export import evaluate

    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "docs" / "quality" / "quality.json"
    committed.parent.mkdir(parents=True)
    committed.write_text('{"committed": true}')

    class CutOff(Exception):
        pass

    checked = []
    real = evaluate.check_writable
    monkeypatch.setattr(evaluate, "check_writable", lambda folder, *a: checked.append(Path(folder)) or real(folder, *a))
    monkeypatch.setattr(evaluate, "open_engines", lambda *a, **k: (_ for _ in ()).throw(CutOff()))
    r = CliRunner().invoke(evaluate.main, ["--threads", "1"])
    assert r.exit_code == 1 and "unexpected CutOff" in r.output, r.output  # reached the work: past every check
    assert checked[0] == Path("deltadit-out") / "pixart-digits-16-fp32-eval"  # the results' folder
    assert committed.read_text() == '{"committed": true}'


# ------------------------------------------------------------------------------------------------ user files


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_reexport_keeps_the_users_files(own_export, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    files = add_user_files(own_export)
    old_key = load_manifest(own_export).export["cache_key"]
    result = export(tiny(own_export, seed=1, force=True), QUIET)
    assert not result.reused and load_manifest(own_export).export["cache_key"] != old_key  # really rebuilt
    assert_user_files(own_export, files)
    assert "kept your file(s)" in result.summary() and "grid.png" in result.summary()
    assert [p.name for p in own_export.parent.iterdir()] == ["pix"]  # no temporaries, no lock file left


def test_failed_reexport_leaves_the_users_files(own_export, monkeypatch):
    from deltadit_export import export_build

    files = add_user_files(own_export)
    monkeypatch.setattr(export_build, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(RuntimeError, match="disk full"):
        export(tiny(own_export, seed=1, force=True), QUIET)
    assert_user_files(own_export, files)


def test_a_user_file_the_new_export_would_overwrite_is_refused(tmp_path):
    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for folder in (out, new):
        folder.mkdir()
        (folder / "front.int8.onnx").write_bytes(folder.name.encode())  # the new export writes this name too
    with pytest.raises(publish.OutputError, match="front.int8.onnx is not part of the export in"):
        publish.carry_user_files(out, new, lambda rel: False)
    assert (out / "front.int8.onnx").read_bytes() == b"out" and (new / "front.int8.onnx").read_bytes() != b"out"


@pytest.mark.slow
def test_calibrate_keeps_the_users_files_and_needs_force_over_another_export(own_export, monkeypatch):
    from deltadit_export import calibrate
    from deltadit_export.cli import main

    files = add_user_files(own_export)
    args = [*TINY_ARGS, "--steps", "4", "-q", "--calibrate", "--psnr-budget", "0", "--calibrate-prompts", "1",
            "--out", str(own_export)]
    real = calibrate.calibrate_export_options
    monkeypatch.setattr(calibrate, "calibrate_export_options", lambda *a, **k: pytest.fail("sweep started"))
    refused = CliRunner().invoke(main, args)  # the folder holds a plain export: refused before the sweep
    assert refused.exit_code == 1 and refused.output.count("Error:") == 1, refused.output
    assert "--steps 20 → 4" in refused.output and "not calibrated → calibrated" in refused.output
    monkeypatch.setattr(calibrate, "calibrate_export_options", real)
    r = CliRunner().invoke(main, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert load_manifest(own_export).calibration is not None
    assert_user_files(own_export, files)


# ------------------------------------------------------------------------------------------------ other options


def test_an_export_with_other_options_is_never_replaced_without_force(own_export):
    before = {p.name: p.read_bytes() for p in own_export.iterdir() if p.is_file()}
    assert export(tiny(own_export), QUIET).reused  # identical: reused, as before
    with pytest.raises(OptionError) as info:
        export(tiny(own_export, cached_blocks=3, boundary=10), QUIET)
    msg = str(info.value)
    assert msg.startswith(f"{own_export} holds an export made with other options (--cached-blocks 4 → 3; "
                          "--boundary 12 → 10)"), msg
    assert "pass --force to replace it, or --out another folder" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in own_export.iterdir() if p.is_file()} == before
    replaced = export(tiny(own_export, cached_blocks=3, boundary=10, force=True), QUIET)
    assert not replaced.reused and load_manifest(own_export).cached_blocks == 3
    # The options are recorded: the plain export is now the one with other options.
    assert load_manifest(own_export).export["options"]["cached_blocks"] == 3
    with pytest.raises(OptionError, match="--cached-blocks 3 → 4"):
        export(tiny(own_export), QUIET)


def test_same_options_with_changed_weights_rebuild_without_force(tmp_path):
    from tiny import tiny_pixart

    weights = tmp_path / "w"
    tiny_pixart().save_pretrained(weights)
    opts = ExportOptions(model="pixart-alpha", resolution=TINY_RESOLUTION, weights=str(weights),
                         out=str(tmp_path / "e"))
    first = load_manifest(export(opts, QUIET).out).export["cache_key"]
    tiny_pixart(seed=1).save_pretrained(weights)  # retrained, saved over the same folder
    again = export(opts, QUIET)
    assert not again.reused and load_manifest(again.out).export["cache_key"] != first


def test_an_export_from_before_recorded_options_is_compared_by_its_manifest(own_export):
    d = json.loads((own_export / MANIFEST_NAME).read_text())
    d["export"].pop("options", None)  # what exports made before this change look like
    d["export"]["cache_key"] = "an older version's key"
    (own_export / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(OptionError, match=r"\(--max-batch 4 → 2\)"):
        export(tiny(own_export, max_batch=2), QUIET)
    assert not export(tiny(own_export), QUIET).reused  # same options, older key: rebuilt without --force


def test_cli_refusal_is_one_error_line(own_export):
    from deltadit_export.cli import main

    r = CliRunner().invoke(main, [*TINY_ARGS, "--opset", "17", "--out", str(own_export), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        f"Error: {own_export} holds an export made with other options (--opset 18 → 17); an export is never "
        "replaced by one with other options without --force: pass --force to replace it, or --out another "
        "folder to keep both"]


def test_bench_refusal_over_another_export_offers_engines(own_export):
    """bench with model flags over an export made with other options (a calibrated default folder, say) is refused
    like the export, and names the way to benchmark that export as it is."""
    from deltadit_export import command

    r = CliRunner().invoke(command.deltadit, ["bench", *TINY_ARGS, "--opset", "17", "--out", str(own_export), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines() == [
        f"Error: {own_export} holds an export made with other options (--opset 18 → 17); an export is never "
        "replaced by one with other options without --force: pass --force to replace it, or --out another "
        f"folder to keep both, or benchmark that export as it is with --engines {own_export}"]


# ------------------------------------------------------------------------------------------------ atomic files

KILL_BEFORE_RENAME = r"""
import os, signal, sys
from deltadit_export import publish
real = os.replace
def replace(src, dst):
    if str(dst).endswith(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # the data is written and flushed; the rename never happens
    return real(src, dst)
os.replace = replace
"""


def run_killed(code: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", KILL_BEFORE_RENAME + code, *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    return r


def test_sigkill_between_write_and_rename_keeps_the_previous_file(tmp_path):
    target = tmp_path / "quality.json"
    publish.write_file(target, "previous good file")
    run_killed("publish.write_file(sys.argv[1], 'x' * 5_000_000)", str(target), "quality.json")
    assert target.read_text() == "previous good file"
    stale = [p.name for p in tmp_path.iterdir() if p.name != "quality.json"]
    assert len(stale) == 1 and stale[0].startswith(".quality.json.tmp-")  # the dead write's temporary
    publish.write_file(target, "next")  # the next write removes it (its writer is gone)
    assert target.read_text() == "next" and [p.name for p in tmp_path.iterdir()] == ["quality.json"]


def test_sigkilled_generate_keeps_the_previous_grid(shipped_export, tmp_path):
    """A real `deltadit generate` killed while grid.png is written (after the data, before the rename)."""
    from deltadit_export.generate import main

    out = tmp_path / "out"
    args = ["--engines", str(shipped_export), "--samples", "1", "--steps", "2", "--no-timing", "--threads", "1",
            "--prompt", "a handwritten digit 3", "--out", str(out), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    good = (out / "grid.png").read_bytes()
    run_killed("from deltadit_export.generate import main\nmain(sys.argv[3:])", str(out), "grid.png",
               *args[:-3], "--seed", "7", "--out", str(out), "-q")
    assert (out / "grid.png").read_bytes() == good


def test_write_failures_keep_the_previous_file_and_say_why(tmp_path, monkeypatch):
    """A full disk found when the data is flushed (delayed allocation): the previous file stays, nothing is left."""
    target = tmp_path / "grid.png"
    publish.write_file(target, b"good")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish.os, "fsync", fsync)
    with pytest.raises(publish.OutputError) as info:
        publish.write_file(target, b"new")
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {target} (No space left on device); the previous grid.png is "
                               "untouched: the disk is full: free space there, or pass --out on another disk")
    assert target.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.fixture
def small_mount(tmpfs):
    """A real 1 MiB tmpfs; remountable read-only."""
    return tmpfs("disk", "1m")


def test_check_writable_on_a_real_full_and_read_only_disk(small_mount):
    (small_mount / "filler").write_bytes(b"\0" * (900 * 1024))  # what is left is below the 256 KiB probe
    with pytest.raises(publish.OutputError) as info:
        publish.check_writable(small_mount / "out")
    assert "cannot write there (No space left on device)" in str(info.value) and "the disk is full" in str(info.value)
    (small_mount / "filler").unlink()
    publish.check_writable(small_mount / "out" / "deeper")
    assert list(small_mount.iterdir()) == []  # probed in the nearest existing parent; nothing left behind
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    with pytest.raises(publish.OutputError, match=r"cannot write there \(Read-only file system\); the file system "
                                                  r"is read-only: pass --out on a writable disk"):
        publish.check_writable(small_mount / "out")


@pytest.mark.parametrize("command", ["generate", "eval", "bench"])
def test_an_unwritable_output_is_refused_before_any_work(command, tmp_path, monkeypatch, request, forbid_work):
    """A file where the output folder should be (always), and a real read-only disk (where mounts work)."""
    from deltadit_export import command as group

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    flag = {"generate": "--out", "eval": "--out", "bench": "--json"}[command]
    target = blocker / ("sub" if command != "bench" else "b.json")
    extra = ["--engines", str(tmp_path)] if command == "bench" else []
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(group.deltadit, [command, flag, str(target), *extra])
    assert r.exit_code in (1, 2) and r.output.count("Error:") == 1 and "Traceback" not in r.output, r.output
    if command == "bench":
        assert f"the folder of {target} does not exist" in r.output, r.output
    else:
        assert f"--out {target}: cannot write there" in r.output and "a file stands where a folder should be" in \
            r.output, r.output
    try:
        mnt = request.getfixturevalue("small_mount")
    except pytest.skip.Exception:
        return
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    target = mnt / ("out" if command != "bench" else "b.json")
    r = CliRunner().invoke(group.deltadit, [command, flag, str(target), *extra])
    assert r.exit_code == 1 and r.output.count("Error:") == 1, r.output
    assert "Read-only file system" in r.output and f"pass {flag} on a writable disk" in r.output


def test_export_on_a_full_disk_fails_before_the_model_loads(pixart_export, small_mount, monkeypatch):
    from deltadit_export import export_build

    monkeypatch.setattr(export_build, "build", lambda *a, **k: pytest.fail("model work started on a full disk"))
    (small_mount / "filler").write_bytes(b"\0" * (900 * 1024))
    with pytest.raises(RuntimeError, match="disk full while writing the export"):
        export(tiny(small_mount / "pix"), QUIET)
    assert sorted(p.name for p in small_mount.iterdir()) == ["filler"]  # no staging folder, no lock left
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    from deltadit_export.cli import main

    r = CliRunner().invoke(main, [*TINY_ARGS, "--out", str(small_mount / "pix"), "-q"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: file-system error while locking the output folder ({small_mount}/.pix.lock: Read-only file system); "
        f"nothing was written to {small_mount}/pix. Check that {small_mount} is writable and on a local file "
        "system, then rerun"], r.output


# ------------------------------------------------------------------------------------------------ the folder lock

HOLD_LOCK = r"""
import sys
from pathlib import Path
from deltadit_export.folder_lock import folder_lock
with folder_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _read_until(stream, needle: str, proc: subprocess.Popen, limit: float = 300) -> str:
    """Lines of ``stream`` up to the one containing ``needle``. Read by a thread, so that a process that waits
    silently fails the test after ``limit`` seconds instead of hanging it (a guard, not a timed assertion)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(stream.readline, "")] and None, daemon=True).start()
    seen, t0 = "", time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            continue
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never came (exit {proc.poll()}): {seen}")


def test_a_second_export_on_the_same_out_waits_for_the_first(tmp_path):
    out = tmp_path / "engines" / "pix"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    exporter = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        exporter = subprocess.Popen([sys.executable, "-m", "deltadit_export", "export", *TINY_ARGS, "--out", str(out)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        said = _read_until(exporter.stderr, "waiting for it to finish", exporter)
        assert f"another deltadit export is writing {out} (pid {holder.pid})" in said
        assert exporter.poll() is None and not out.exists()  # it waits: nothing built, nothing written
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        assert exporter.wait(timeout=600) == 0  # its stderr is drained by _read_until's thread
        assert load_manifest(out).segments and "total" in exporter.stdout.read()
        assert sorted(p.name for p in out.parent.iterdir()) == ["pix"]  # the lock file went with its holder
    finally:
        for p in (holder, exporter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_two_exports_at_once_one_builds_the_other_reuses(tmp_path):
    out = tmp_path / "pix"
    cmd = [sys.executable, "-m", "deltadit_export", "export", *TINY_ARGS, "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    reused = ["reused the existing export" in stdout for stdout, _ in results]
    assert sorted(reused) == [False, True], results  # never two builds where one silently wins
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pix"]


def test_a_lock_left_by_a_killed_export_does_not_block(tmp_path):
    out = tmp_path / "pix"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert folder_lock.lock_path(out).exists()  # left behind by the SIGKILL; the kernel released the lock
    waited = []
    with folder_lock.folder_lock(out, on_wait=waited.append):
        pass
    assert waited == [] and not folder_lock.lock_path(out).exists()


def test_eval_replaces_its_own_default_export_made_with_other_options(shipped_export, tmp_path, monkeypatch):
    """eval's default folder is its own cache (it has no --force): an export there with other options (another
    deltadit's defaults, a hand-made one) is re-exported with eval's, not refused; files of yours stay."""
    from deltadit_export import evaluate
    from deltadit_export.eval_rows import EVAL_MAX_BATCH

    folder = tmp_path / "eval-engines"
    shutil.copytree(shipped_export, folder)  # --max-batch 4, eval's is another
    (folder / "notes.txt").write_text("mine")
    assert load_manifest(folder).max_batch != 2 * EVAL_MAX_BATCH
    monkeypatch.setattr(evaluate, "DEFAULT_EVAL_ENGINES", folder)
    got, runtime = evaluate.open_engines(None, 1)
    assert got == folder and runtime.manifest.max_batch == 2 * EVAL_MAX_BATCH
    assert (folder / "notes.txt").read_text() == "mine"
