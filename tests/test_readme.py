"""The README's first Python example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["session"].memory.num_slots == 6
    assert (tmp_path / "memory.safetensors").is_file() and (tmp_path / "my-adapter" / "adapter.safetensors").is_file()
    assert len(ns["reply"]) == 8


def test_cli_tiny_demo_runs(capsys):
    from ccmem.cli import main

    assert main(["demo", "--tiny", "--turns", "3"]) == 0
    out = capsys.readouterr().out
    assert "compress" in out and "memory key/value size = 6" in out
