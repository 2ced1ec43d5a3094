"""The command line: the `deltadit` group and its aliases, --version everywhere, --print-schedule without a
model, messages and progress bars under -q, help texts, one guidance default per model, refused prompts,
labelled comparison grids, files written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import TINY_PIXART_SET, TINY_RESOLUTION, set_args

from deltadit_export import command
from deltadit_export.console import bar, setup_logging
from deltadit_export.models import ModelError, check_prompt, model_guidance
from deltadit_export.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ALIASES = {"deltadit-export": "export", "deltadit-generate": "generate", "deltadit-bench": "bench",
           "deltadit-eval": "eval", "deltadit-runtime": "runtime"}


def run_py(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, **kw)


# ---------------------------------------------------------------- one command, aliases, --version


@pytest.mark.parametrize("argv", [[], *[[name] for name in ("export", "generate", "bench", "eval", "runtime")],
                                  ["runtime", "info"], ["runtime", "schedule"]])
def test_every_command_has_version_and_short_help(argv):
    r = CliRunner().invoke(command.deltadit, [*argv, "--version"])
    assert r.exit_code == 0 and r.output.strip() == "deltadit 0.1.0", r.output
    h = CliRunner().invoke(command.deltadit, [*argv, "-h"])
    assert h.exit_code == 0 and h.output.startswith("Usage:"), h.output
    assert "``" not in h.output and ":func:" not in h.output  # no raw RST in --help


@pytest.mark.parametrize("script", sorted(ALIASES))
def test_installed_aliases_have_version(script):
    exe = BIN / script
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed (pip install -e . writes it)")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"{script} 0.1.0", r.stdout + r.stderr


def test_alias_functions_are_the_group_commands(capsys):
    """The old script names run the same commands as `deltadit <command>` (here: their --print-schedule)."""
    args = ["--model", "pixart-alpha", "--print-schedule", "--steps", "6", "--policy", "delta-front"]
    with pytest.raises(SystemExit) as e:
        command.export_alias(args)
    assert e.value.code == 0
    via_alias = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        command.main(["export", *args])
    assert e.value.code == 0
    assert capsys.readouterr().out == via_alias and "policy delta-front: T=6" in via_alias
    for name in ("export", "generate", "bench", "eval"):
        with pytest.raises(SystemExit) as e:
            getattr(command, f"{name}_alias")(["--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"deltadit-{name} 0.1.0"


def test_group_help_lists_every_command_without_importing_torch():
    r = run_py("import sys\nfrom deltadit_export.command import main\n"
               "try:\n    main(['-h'])\nexcept SystemExit:\n    pass\n"
               "print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    for name in ("export", "generate", "bench", "eval", "runtime", "serve"):
        assert f"  {name} " in r.stdout
    assert r.stdout.strip().endswith("False")


def test_serve_says_clearly_when_serving_is_not_installed():
    import importlib.util

    if importlib.util.find_spec("runtime.serving") is not None:
        r = CliRunner().invoke(command.deltadit, ["serve", "-h"])
        assert r.exit_code == 0, r.output  # merged: the serve group answers
        return
    r = CliRunner().invoke(command.deltadit, ["serve", "triton", "--anything"])
    assert r.exit_code == 1
    assert "Error: serving is not installed" in r.output and "Traceback" not in r.output


def test_entry_point_sets_passive_waiting_before_torch_is_imported():
    r = run_py("import os, sys\nfrom deltadit_export.timing import prefer_passive_wait\n"
               "print(prefer_passive_wait()); import torch; print(os.environ['OMP_WAIT_POLICY'])",
               env={k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "PASSIVE" and "set before torch was imported" in r.stdout


# ---------------------------------------------------------------- --print-schedule needs only L


def test_print_schedule_without_weights_loads_no_model(tmp_path):
    """pixart-alpha has no weights here: L comes from the registry (28); no torch, no diffusers imported."""
    code = ("import sys\nfrom deltadit_export.cli import main\n"
            "main(['--model', 'pixart-alpha', '--print-schedule'], standalone_mode=False)\n"
            "print('imported:', [m for m in ('torch', 'diffusers', 'onnxruntime') if m in sys.modules])")
    r = run_py(code, env={**__import__("os").environ, "HF_HOME": str(tmp_path / "empty-hf")})
    assert r.returncode == 0, r.stderr
    assert "policy delta-dit: T=20 N=2 N_c=21 b=12 L=28" in r.stdout
    assert "block-runs 350 of 560" in r.stdout and "imported: []" in r.stdout


def test_print_schedule_takes_l_from_set_weights_and_the_shipped_model(tmp_path):
    from deltadit_export.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["--model", "pixart-alpha", "--random-weights", "--set", "num_layers=12",
                             "--print-schedule", "--steps", "10"])
    assert r.exit_code == 0 and "T=10 N=2 N_c=9 b=6 L=12" in r.output, r.output
    folder = tmp_path / "weights"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"num_layers": 8}))  # no weight files needed
    r = runner.invoke(main, ["--model", "pixart-alpha", "--weights", str(folder), "--print-schedule"])
    assert r.exit_code == 0 and "L=8" in r.output and "N_c=6" in r.output, r.output
    r = runner.invoke(main, ["--print-schedule"])  # pixart-digits: its shipped config says 12 blocks
    assert r.exit_code == 0 and "N_c=9 b=12 L=12" in r.output, r.output
    r = runner.invoke(main, ["--model", "pixart-alpha", "--print-schedule", "--cached-blocks", "28"])
    assert r.exit_code == 1 and "--cached-blocks=28 is out of range" in r.output
    r = runner.invoke(main, ["--print-schedule", "--policy", "fastest"])
    assert r.exit_code == 2 and "'fastest' is not one of" in r.output


def test_help_is_true_for_the_models():
    from deltadit_export.cli import main

    out = CliRunner().invoke(main, ["-h"], terminal_width=200).output
    assert "9 of 12 for pixart-digits" in out and "21 of 28 for dit-xl-2 and pixart-alpha" in out
    assert "pixart-digits 16" in out
    assert "[none|delta-dit|delta-front|delta-rear|output-cache]" in out


# ---------------------------------------------------------------- messages and progress


class FakeTTY:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_export_progress_is_a_tqdm_bar_on_a_terminal_and_silent_when_quiet():
    tty = FakeTTY()
    with Progress(stream=tty).segment("front", ("export", "parity")) as b:
        b.phase("export")
        b.phase("parity")
    assert "front" in tty.text and "2/2" in tty.text and "\r" in tty.text  # tqdm redraws in place
    quiet = FakeTTY()
    with Progress(stream=quiet, quiet=True).segment("front", ("export", "parity")) as b:
        b.phase("export")
    assert quiet.text == ""


def test_bars_follow_the_log_level():
    setup_logging(quiet=True)
    try:
        assert bar(range(3), desc="x").disable
    finally:
        setup_logging()
    assert not bar(range(3), desc="x").disable


def test_quiet_silences_notes_and_bars_of_a_command(tmp_path):
    """-q: nothing on stderr for a whole export (notes, per-segment progress), the summary still on stdout;
    without -q both the notes and the progress come."""
    from deltadit_export.cli import main

    args = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
            *set_args(TINY_PIXART_SET), "--out", str(tmp_path / "e")]
    loud = CliRunner().invoke(main, [*args, "--force"])
    assert loud.exit_code == 0, loud.output
    assert "loading pixart-alpha" in loud.stderr and "front" in loud.stderr
    quiet = CliRunner().invoke(main, [*args, "--force", "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and "max rel err" in quiet.stdout


def test_quiet_silences_the_timing_bar(pixart_export):
    from deltadit_export.bench import cli

    args = ["--engines", str(pixart_export), "--modes", "none", "--steps", "2", "--repeats", "1", "--threads", "1"]
    loud = CliRunner().invoke(cli, args)
    assert loud.exit_code == 0, loud.output
    assert "bench:" in loud.stderr and "run" in loud.stderr  # the tqdm bar of the timed runs
    quiet = CliRunner().invoke(cli, [*args, "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "bench:" not in quiet.stderr and "setting up" not in quiet.stderr
    assert "load average" in quiet.stdout  # the report itself is not a message


# ---------------------------------------------------------------- guidance: one default per model


def test_guidance_defaults_come_from_the_registry_and_the_manifest(dit_export, pixart_export):
    from runtime.manifest import load_manifest

    assert model_guidance("dit-xl-2") == 4.0 and model_guidance("pixart-alpha") == 4.5
    assert model_guidance("pixart-digits") == 3.0  # its model card's (training_summary.json)
    assert load_manifest(dit_export).default_guidance == 4.0
    assert load_manifest(pixart_export).conditioning["guidance_scale"] == 4.5


def test_runtime_generate_defaults_to_the_manifests_guidance(dit_export, one_torch_thread):
    from runtime import DeltaDiTRuntime
    from runtime.sampling import generate

    rt = DeltaDiTRuntime(dit_export)
    kw = dict(class_labels=torch.tensor([3]), num_steps=3, policy="none",
              latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    default = generate(rt, **kw).latents
    assert torch.equal(default, generate(rt, **kw, guidance_scale=4.0).latents)
    assert not torch.equal(default, generate(rt, **kw, guidance_scale=4.5).latents)


def test_a_bad_recorded_guidance_is_refused(pixart_export, tmp_path):
    import shutil

    from runtime.manifest import ManifestError, load_manifest

    folder = tmp_path / "copy"
    shutil.copytree(pixart_export, folder)
    d = json.loads((folder / "manifest.json").read_text())
    d["conditioning"]["guidance_scale"] = "high"
    (folder / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="conditioning.guidance_scale"):
        load_manifest(folder)


# ---------------------------------------------------------------- prompts, grids, files


def test_a_prompt_the_shipped_model_cannot_know_is_refused():
    check_prompt("pixart-digits", "A handwritten digit 7!")
    check_prompt("pixart-digits", "")  # the unconditional prompt
    check_prompt("pixart-alpha", "digit 11")  # other models take any caption
    for bad, word in (("digit 11", "'11'"), ("a handwritten letter A", "'letter'")):
        with pytest.raises(ModelError) as e:
            check_prompt("pixart-digits", bad)
        assert f"cannot know {word} " in str(e.value) and "a handwritten digit 7" in str(e.value)


def test_comparison_grid_has_column_names_and_row_labels():
    from deltadit_export.imaging import comparison_image, grid_image, to_uint8

    full, delta = torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 16, 16)
    bare = comparison_image(full, delta, prompts=2, per_prompt=2, shown=2, names=None)
    labelled = comparison_image(full, delta, prompts=2, per_prompt=2, shown=2, row_labels=["3", "8"])
    top, left = labelled.shape[0] - bare.shape[0], labelled.shape[1] - bare.shape[1]
    assert top > 0 and left > 0
    assert np.array_equal(labelled[top:, left:], bare)  # the images are untouched, the labels sit outside
    assert (labelled[:top, left:] < 128).any()  # column names drawn
    assert (labelled[top:, :left] < 128).any()  # row labels drawn
    assert bare.shape == grid_image(to_uint8(torch.zeros(12, 1, 16, 16)), cols=6, gap_every=3).shape


def test_files_are_written_through_a_temporary_and_renamed(tmp_path):
    from deltadit_export.publish import write_file

    target = tmp_path / "out" / "quality.json"
    write_file(target, "old")
    write_file(target, b"new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["quality.json"]


# ---------------------------------------------------------------- every error is one Error: line (issue 9 §5)


GUIDANCE_RANGE = "expected a number ≥ 1 and ≤ 100; 1 = no guidance, > 1 turns classifier-free guidance on"
TINY_EXPORT = ["--model", "pixart-alpha", "--random-weights", "--resolution", str(TINY_RESOLUTION),
               *set_args(TINY_PIXART_SET)]
ISSUE_CASES = [  # (argv, exit code, the Error line) for the failures listed in issue 9 §5
    (["generate", "--guidance", "inf"], 2,
     f"Error: Invalid value for '--guidance': 'inf' is not a finite number: {GUIDANCE_RANGE}"),
    (["generate", "--guidance", "nan"], 2,  # it used to disable guidance silently
     f"Error: Invalid value for '--guidance': 'nan' is not a finite number: {GUIDANCE_RANGE}"),
    (["eval", "--guidance", "0.5"], 2, f"Error: Invalid value for '--guidance': 0.5 is out of range: {GUIDANCE_RANGE}"),
    (["bench", "--guidance-scale", "nan"], 2, "Error: Invalid value for '--guidance-scale': 'nan' is not a finite "
     "number: expected a number > 1 and ≤ 100; 1 = no guidance, > 1 turns classifier-free guidance on"),
    (["generate", "--seed", str(2**70)], 2,
     "Error: Invalid value for '--seed': 1180591620717411303424 is not in the range 0<=x<=9223372036854775807."),
    (["bench", "--sample-seed", "-1"], 2,
     "Error: Invalid value for '--sample-seed': -1 is not in the range 0<=x<=9223372036854775807."),
    (["export", *TINY_EXPORT, "--set", "norm_eps=abc"], 1,
     "Error: --set norm_eps='abc': expected a finite number (the PixArtTransformer2DModel default is 1e-06)"),
    (["export", *TINY_EXPORT, "--set", "norm_eps=NaN"], 1,
     "Error: --set norm_eps=nan: expected a finite number (the PixArtTransformer2DModel default is 1e-06)"),
    (["export", *TINY_EXPORT, "--set", "num_layers=100000"], 1,
     "Error: --set num_layers=100000: expected a positive integer ≤ 1,024"),
    (["export", "--model", "pixart-alpha", "--random-weights", "--set", "num_attention_heads=1024"], 1,
     "Error: --set: this PixArtTransformer2DModel would have about 1.8e+12 parameters (28 blocks of width 73728), "
     "more than the 2e+10 the exporter builds in memory (PixArt-α has 6e8); choose smaller --set values"),
    (["export", "--model", "pixart-alpha", "--random-weights", "--resolution", "65536"], 1,
     "Error: --resolution 65536: 16,777,216 latent tokens, more than the 65,536 an export may have (PixArt-Σ at 4K, "
     "the largest published DiT, has 65,536); pass a smaller --resolution"),
    (["export", "--calibrate", "--psnr-budget", "inf"], 2,
     "Error: Invalid value for '--psnr-budget': 'inf' is not a finite number: expected a number ≥ 0 and ≤ 200"),
    (["eval", "--samples-per-digit", "0"], 2,
     "Error: Invalid value for '--samples-per-digit': 0 is not in the range 1<=x<=1000."),
    (["eval", "--rows", "bogus"], 2, "Error: Invalid value for '--rows': 'bogus': expected a comma-separated subset "
     "of full, delta-dit, delta-front, delta-rear, output-cache, pytorch full, FirstBlockCache, "
     "PyramidAttentionBroadcast, FasterCache, TaylorSeer, MagCache, 'fewer steps T=<n>'"),
    (["eval", "--rows", "TaylorSeer", "--no-hooks"], 2, "Error: Invalid value for '--rows': TaylorSeer: diffusers "
     "hook rows, which --no-hooks skips; drop one of the two"),
    (["eval", "--steps", "100000000"], 1, "Error: num_steps=100000000 is out of range: expected 1 ≤ num_steps ≤ 10000 "
     "(longer schedules are refused: no sampler uses more than 1000 steps)"),
    (["bench", "--steps", "100000000"], 1, "Error: num_steps=100000000 is out of range: expected 1 ≤ num_steps ≤ "
     "10000 (longer schedules are refused: no sampler uses more than 1000 steps)"),
    (["bench", "--steps", "4", "--boundary", "9"], 1, "Error: boundary=9 is out of range: expected 0 ≤ boundary ≤ 4 "
     "(the boundary step b, with T=4)"),  # before the export the model flags would start
    *[([cmd, "--threads", "0"], 2, "Error: Invalid value for '--threads': 0 is not in the range 1<=x<=1024.")
      for cmd in ("generate", "bench", "eval")],
    (["eval", "--gen-threads", "0"], 2, "Error: Invalid value for '--gen-threads': 0 is not in the range 1<=x<=1024."),
    (["generate", "--samples", "1000", *[a for d in range(11) for a in ("--prompt", f"a handwritten digit {d % 10}")]],
     2, "Error: Invalid value for '--samples': 11 prompts × 1000 samples = 11000 images, more than the 10000 one run "
        "generates; pass fewer"),
    *[([cmd, "--out", "\udcff"], 2, "Error: Invalid value for '--out': '\\udcff' is not valid UTF-8: deltadit writes "
       "names and paths into JSON and messages; rename it or pass a UTF-8 name") for cmd in ("export", "generate",
                                                                                              "eval")],
    (["bench", "--prompt", "digit \udcff"], 2, "Error: Invalid value for '--prompt': 'digit \\udcff' is not valid "
     "UTF-8: deltadit writes names and paths into JSON and messages; rename it or pass a UTF-8 name"),
]


@pytest.mark.parametrize("argv, code, line", ISSUE_CASES, ids=[" ".join(c[0][:3])[:40] for c in ISSUE_CASES])
def test_each_failure_of_the_issue_is_one_error_line(argv, code, line, monkeypatch, tmp_path, forbid_work):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(command.deltadit, argv)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert [x for x in r.output.splitlines() if x.startswith("Error:")] == [line], r.output


def test_a_non_utf8_out_from_a_real_shell_is_one_short_line(tmp_path):
    """The bytes a shell passes (here 0xff), as a subprocess: it used to print a 57 KB traceback."""
    exe = BIN / "deltadit"
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed (pip install -e . writes it)")
    r = subprocess.run([str(exe), "export", "--out", b"\xff"], capture_output=True, cwd=tmp_path)
    assert r.returncode == 2 and b"Traceback" not in r.stderr and len(r.stderr) < 1000, r.stderr
    assert r.stderr.decode().splitlines()[-1] == ("Error: Invalid value for '--out': '\\udcff' is not valid UTF-8: "
                                                  "deltadit writes names and paths into JSON and messages; rename it "
                                                  "or pass a UTF-8 name")
    assert not list(tmp_path.iterdir())  # nothing was made


def test_an_unmapped_failure_is_one_line_and_its_traceback_goes_to_the_log(monkeypatch, tmp_path):
    """The last guard: a bug (here a ZeroDivisionError where the output folder is checked) is still one line."""
    from deltadit_export import generate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "check_writable", lambda *a, **k: 1 / 0)
    r = CliRunner().invoke(command.deltadit, ["generate"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["Error: unexpected ZeroDivisionError: division by zero (a deltadit bug: "
                                             "please report it with the command line; -v shows the traceback)"]
    loud = CliRunner().invoke(command.deltadit, ["generate", "-v"])
    assert loud.exit_code == 1 and "Traceback" in loud.stderr and "1 / 0" in loud.stderr


def test_runtime_cli_errors_are_one_line(pixart_export, tmp_path, monkeypatch):
    import runtime.__main__ as runtime_cli

    r = CliRunner().invoke(runtime_cli.cli, ["schedule", str(pixart_export), "--steps", str(2**70)])
    assert r.exit_code == 1 and r.output.startswith("Error: num_steps=1180591620717411303424 is out of range"), r.output
    # The runtime CLI's own last guard (it imports nothing of deltadit_export): here a file it cannot read.
    monkeypatch.setattr(runtime_cli, "describe", lambda *a, **k: open(tmp_path / "unreadable"))
    r = CliRunner().invoke(runtime_cli.cli, ["info", str(pixart_export)])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.startswith(
        "Error: unexpected FileNotFoundError: [Errno 2] No such file or directory"), r.output


# ---------------------------------------------------------------- --no-verify, named in the integrity errors


def _changed_scheduler(shipped_export, tmp_path) -> Path:
    import shutil

    folder = tmp_path / shipped_export.name
    shutil.copytree(shipped_export, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text() + "\n")  # changed on purpose, still a valid config
    return folder


def test_generate_no_verify_loads_a_folder_changed_on_purpose(shipped_export, tmp_path):
    from deltadit_export.generate import main

    folder = _changed_scheduler(shipped_export, tmp_path)
    args = ["--engines", str(folder), "--samples", "1", "--steps", "2", "--no-timing", "--threads", "1",
            "--prompt", "a handwritten digit 3", "--out", str(tmp_path / "out"), "-q"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "was changed or damaged after export" in refused.output
    assert "(CLI: --no-verify)" in refused.output  # the message names a flag this command has
    ok = CliRunner().invoke(main, [*args, "--no-verify"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "grid.png").is_file()


def test_bench_no_verify_reaches_the_worker_runtimes(pixart_export, tmp_path):
    import shutil

    from deltadit_export.bench import cli

    folder = tmp_path / "pix"
    shutil.copytree(pixart_export, folder)
    data = folder / "rear.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1  # one weight's last bit: still loadable, no longer the hashed file
    data.write_bytes(bytes(raw))
    args = ["--engines", str(folder), "--modes", "none", "--steps", "2", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "-q"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "rear.onnx.data was changed or damaged" in refused.output, refused.output
    ok = CliRunner().invoke(cli, [*args, "--no-verify"])
    assert ok.exit_code == 0, ok.output


def test_eval_no_verify_is_passed_to_the_runtime(monkeypatch, tmp_path):
    from deltadit_export import evaluate

    seen = {}

    def open_engines(engines, threads, trust_artifacts=False, verify=True):
        seen["verify"] = verify
        raise evaluate.click.ClickException("stop here")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "open_engines", open_engines)
    CliRunner().invoke(evaluate.main, ["--no-verify", "--threads", "1"])
    assert seen == {"verify": False}


def test_eval_refuses_a_fewer_steps_row_the_export_has_not_before_any_work(shipped_export, monkeypatch, tmp_path):
    from deltadit_export import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "eval_setup", lambda *a, **k: pytest.fail("work started"))
    r = CliRunner().invoke(evaluate.main, ["--engines", str(shipped_export), "--rows", "fewer steps T=99",
                                           "--threads", "1"])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        "Error: Invalid value for '--rows': 'fewer steps T=99': this export's rows are full, delta-dit, delta-front, "
        "delta-rear, output-cache, fewer steps T=12, fewer steps T=13, pytorch full and the hooks"), r.output
