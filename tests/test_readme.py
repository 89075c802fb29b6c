"""The README a newcomer reads: short, every link lands on a file, every quick-start command parses."""
import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_at_most_15000_characters():
    assert len((ROOT / "README.md").read_text()) <= 15_000  # characters, as the issue counts them (wc -c: bytes)
    assert (ROOT / "README.md").stat().st_size <= 15_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_in_the_repo(page):
    links = [m.group(1) for m in LINK.finditer(page.read_text())]
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link) or link.startswith("#"):  # https:, mailto:, a heading on the same page
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve()
        if not target.is_file() or ROOT not in target.parents:
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in headings(target):
            broken.append(link)
    assert not broken, f"{page.name}: {broken}"


def headings(page: Path) -> set[str]:
    """The page's heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def quick_start_commands() -> list[str]:
    """Every command in the quick start's code blocks (`a && b` is two), without its comment."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def test_the_quick_start_has_the_commands_ci_runs():
    commands = quick_start_commands()
    assert "bash install.sh" in commands and "bash install.sh --dev" in commands
    assert "python train_r3.py --task countdown" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests/" in commands and "python -m pytest -q tests/" in ci


class Parsed(Exception):
    """Raised in place of running the command, once its flags have parsed."""


@pytest.mark.parametrize("command", quick_start_commands())
def test_every_quick_start_command_parses(command, monkeypatch, tmp_path):
    """A dry run: the command's own parser reads the README's flags (an unknown flag or a bad value fails,
    as it would for the reader), and the command stops there, before any model loads."""
    words = shlex.split(command)
    if words[0] == "bash":  # install.sh: valid bash, and the flag the README gives is one it handles
        assert subprocess.run(["bash", "-n", str(ROOT / words[1])]).returncode == 0
        assert all(f'"{flag}"' in (ROOT / words[1]).read_text() for flag in words[2:])
        return
    assert words[0] == "python", f"the test does not know how to dry-run: {command}"
    if words[1:3] == ["-m", "pytest"]:
        assert importlib.util.find_spec("pytest") and all((ROOT / w).exists() for w in words[3:] if not w.startswith("-"))
        return
    script, argv = words[1], words[2:]
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.chdir(tmp_path)  # nothing the command might write lands in the repo
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    module = importlib.import_module(Path(script).stem)
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            module.main()
        assert e.value.code == 0
        return
    with pytest.raises(Parsed):
        module.main()
