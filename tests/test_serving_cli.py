"""The `serve` command group: one `Error:` line for what a user can get wrong, loopback-only load tests."""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime.serving.cli import serve
from runtime.serving.client import ClientError, check_loopback


def _invoke(*args):
    return CliRunner().invoke(serve, list(args))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.3.4.5:9", "http://localhost:8000/x",
                                 "http://[::1]:8000"])
def test_loopback_urls_are_accepted(url):
    assert check_loopback(url).port


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://192.168.1.2:8000", "http://example.com:80",
                                 "https://127.0.0.1:8000", "http://127.0.0.1", "http://0.0.0.0:8000"])
def test_other_urls_are_refused(url):
    with pytest.raises(ClientError, match="this machine only"):
        check_loopback(url)


def test_load_test_refuses_a_remote_url_before_sending_anything():
    result = _invoke("load-test", "--url", "http://10.1.2.3:8000", "--requests", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --url 'http://10.1.2.3:8000': the load test sends traffic to this machine")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_load_test_without_a_server_says_so():
    from serving_support import free_port

    result = _invoke("load-test", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert result.exit_code == 1 and result.output.startswith("Error: no server answers at")


def test_triton_repo_command(digits_export, tmp_path):
    result = _invoke("triton-repo", str(digits_export), "--out", str(tmp_path / "repo"), "--instances", "2")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "repo" / "deltadit" / "config.pbtxt").is_file()
    again = _invoke("triton-repo", str(digits_export), "--out", str(tmp_path / "repo"))
    assert again.exit_code == 1 and again.output.startswith("Error:") and "--force" in again.output
    missing = _invoke("triton-repo", str(tmp_path / "nothing"), "--out", str(tmp_path / "repo2"))
    assert missing.exit_code == 1 and missing.output.startswith("Error: no manifest at")
    assert not (tmp_path / "repo2" / "deltadit").exists()


def test_usage_errors_exit_2(digits_export):
    assert _invoke("bench", str(digits_export), "--servers", "tgi").exit_code == 2
    assert _invoke("bench", str(digits_export), "--instances", "0").exit_code == 2
    assert _invoke("triton-repo", str(digits_export), "--out", "x", "--instances", "0").exit_code == 2


def test_ray_command_checks_the_folder_before_starting_ray(tmp_path):
    result = _invoke("ray", str(tmp_path))
    assert result.exit_code == 1 and result.output.startswith("Error: no manifest at")


def test_python_dash_m_entry_point():
    run = subprocess.run([sys.executable, "-m", "runtime.serving", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0
    for command in ("triton-repo", "triton", "ray", "load-test", "bench"):
        assert command in run.stdout


COMMANDS = ("triton-repo", "triton", "ray", "load-test", "bench")


def test_every_command_takes_h_and_version():
    from deltadit_export.command import deltadit

    runner = CliRunner()
    for args in [[], *([c] for c in COMMANDS)]:
        for group, prefix, prog in ((serve, [], "python -m runtime.serving"), (deltadit, ["serve"], "deltadit")):
            shown = runner.invoke(group, [*prefix, *args, "-h"], prog_name=prog)
            assert shown.exit_code == 0 and "Usage:" in shown.output and "--version" in shown.output, (args, shown.output)
            versioned = runner.invoke(group, [*prefix, *args, "--version"], prog_name=prog)
            assert (versioned.exit_code, versioned.output) == (0, f"{prog} {version('deltadit')}\n"), args


def _readme_serve_commands() -> list[list[str]]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("## Serving")
    section = readme[start:readme.index("\n## ", start)]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("deltadit serve ")]
    return [shlex.split(line, comments=True) for line in lines]


def test_readme_serve_commands_work_as_written(digits_export, tmp_path, monkeypatch):
    """Each `deltadit serve ...` line of the README's Serving section, through the `deltadit` group: triton-repo
    runs (on the shipped model at the README's path); the servers and the load test are parsed with every option
    and value as written (they run for real in test_serving_triton.py / test_serving_ray.py)."""
    from deltadit_export import command

    commands = _readme_serve_commands()
    assert {args[2] for args in commands} == {"triton-repo", "triton", "ray", "load-test"}
    assert command.load_subcommand("serve") is serve  # `deltadit serve` is this group
    monkeypatch.chdir(tmp_path)
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "pixart-digits-16-fp32").symlink_to(digits_export)
    for args in commands:
        assert args[:2] == ["deltadit", "serve"], args
        if args[2] == "triton-repo":
            result = CliRunner().invoke(command.deltadit, args[1:], prog_name="deltadit")
            assert result.exit_code == 0, (args, result.output)
            assert (tmp_path / "model_repository" / "deltadit" / "config.pbtxt").is_file()
            continue
        sub = serve.get_command(None, args[2])
        with sub.make_context(args[2], args[3:]) as ctx:  # every option name, type and range checked
            assert ctx.params, args
