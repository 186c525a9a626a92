"""The README and docs/ stay true to the CLI: every command and flag they show exists (asked of the real
``--help`` in a subprocess, as a user would), every docs/ page is reachable from the README, and every
relative link and anchor points at something that is there."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *PAGES]
SUBCOMMANDS = {"run", "validate", "plan", "resume", "status", "report", "export", "slurm", "data"}

# What starts one of our commands (not Python's `from sweeper import ...`); a command ends at a shell
# separator or a comment.
PROGRAM = re.compile(
    r"(?<!from)(?<!import)(?:^|[\s(`$])(python -m sweeper|python -m trainables|sweeper)\s+(.*)"
)
END = re.compile(r"\s(?:\||#|;|&&|>)|`")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _code_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and the contents of inline code spans."""
    lines, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            lines.append(line)
        else:
            lines.extend(re.findall(r"`([^`]+)`", line))
    return lines


def _commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(program, subcommand, flags) of every command of ours the file shows."""
    found = []
    for line in _code_lines(path.read_text()):
        match = PROGRAM.search(line)
        if not match:
            continue
        program, rest = match.groups()
        rest = END.split(" " + rest, maxsplit=1)[0]
        words = rest.split()
        if program == "python -m trainables":
            sub = ""
        else:
            sub = words[0] if words else ""
            if sub == "data":
                sub = "data " + (words[1] if len(words) > 1 else "")
        flags = [f for f in FLAG.findall(rest) if f != "--help"]
        found.append((program, sub, flags))
    return found


@functools.cache
def _help(program: str, sub: str) -> str:
    module = "trainables" if program == "python -m trainables" else "sweeper"
    out = subprocess.run(
        [sys.executable, "-m", module, *sub.split(), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, f"{program} {sub} --help failed: {out.stderr}"
    assert "Traceback" not in out.stderr
    return out.stdout


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_the_docs_show_exists(path):
    for program, sub, flags in _commands(path):
        if program != "python -m trainables":
            assert sub in SUBCOMMANDS | {"data prepare"}, f"{path.name}: `{program} {sub}` is no command"
        text = _help(program, sub)
        for flag in flags:
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", text), (
                f"{path.name}: `{program} {sub} {flag}`: no such option in its --help"
            )


def test_the_docs_show_every_command_and_the_checks_read_them():
    shown = {(p, s) for path in DOCS for p, s, _ in _commands(path)}
    # Every subcommand the CLI has is documented, and the extraction is not silently finding nothing.
    top = _help("sweeper", "")
    listed = set(re.search(r"\{([a-z,]+)\}", top).group(1).split(","))
    assert listed == SUBCOMMANDS
    for sub in SUBCOMMANDS - {"data"} | {"data prepare"}:
        assert any(s == sub for _, s in shown), f"no page shows `sweeper {sub}`"
    assert ("python -m trainables", "") in shown
    commands_page = (ROOT / "docs" / "commands.md").read_text()
    for variable in re.findall(r"^  ([A-Z_]+)\s", top, re.MULTILINE):
        assert f"`{variable}`" in commands_page, f"{variable} (in --help) is not in docs/commands.md"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"](docs/{page.name})" in readme, f"docs/{page.name} is not linked from README.md"
    assert "](CONTRIBUTING.md)" in readme


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.MULTILINE)
            assert anchor in {_anchor(h) for h in headings}, f"{path.name}: no heading for #{anchor}"
