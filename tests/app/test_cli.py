import json
import subprocess
import sys

from modular.app.cli import main


def _modular(*args):
    return subprocess.run([sys.executable, "-m", "modular.app.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    proc = _modular("--help")
    assert proc.returncode == 0, proc.stderr
    assert "doctor" in proc.stdout and "demo" in proc.stdout


def test_doctor_runs_on_cpu():
    proc = _modular("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout and "experts implementations" in proc.stdout


def test_doctor_json():
    proc = _modular("doctor", "--json")  # a fresh process: moe is imported only through its entry points
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["distributed_backends"]["gloo"] is True
    assert {"eager", "modular", "megablocks"} <= set(report["experts_implementations"])
    assert report["versions"]["transformers"].startswith("5.")


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: modular" in capsys.readouterr().out
