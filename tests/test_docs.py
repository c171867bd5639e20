"""The docs cannot drift: every CLI option is documented, every relative link resolves.

No TensorFlow here: `regularize.cli` imports none, and nothing below builds a model.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from regularize.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# The README's test commands, which .ci/run and reviewers look for verbatim.
TEST_COMMANDS = [
    'python3 -m pip install -e ".[test]" && ruff check . '
    "&& python3 -m pytest -n 2 --dist loadscope",
    "python3 -m pytest -n 2 --dist loadscope -m slow",
]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _command_options():
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option):
                for opt in [*param.opts, *param.secondary_opts]:
                    yield name, opt


def _mentions(text: str, opt: str) -> bool:
    # A whole option: `--rate` is not found in `--rates` or `--recurrent-rate`, `-o` not in `--out`.
    return re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text) is not None


def _section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next heading of level 2 or above."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match, f"{CLI_DOC.relative_to(ROOT)} has no section '## {heading}'"
    return match.group(1)


def _prose(text: str) -> str:
    """Markdown without code: links inside code blocks or code spans are not links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links():
    for page in PAGES:
        text = _prose(page.read_text(encoding="utf-8"))
        for target in [*_LINK.findall(text), *_REFERENCE.findall(text)]:
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            yield page, target


def test_docs_exist():
    assert CLI_DOC.is_file()
    assert len(PAGES) > 2


@pytest.mark.parametrize(("command", "option"), list(_command_options()), ids=lambda v: v)
def test_every_option_is_in_its_command_section(command, option):
    section = _section(CLI_DOC.read_text(encoding="utf-8"), f"regularize {command}")
    assert _mentions(section, option), (
        f"`regularize {command} {option}` is not documented in the section "
        f"'## regularize {command}' of {CLI_DOC.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("option", [o for p in cli.params for o in p.opts if o.startswith("-")])
def test_every_group_option_is_documented(option):
    assert _mentions(CLI_DOC.read_text(encoding="utf-8"), option)


def test_option_check_is_strict():
    # The check finds whole options only, so a missing option cannot hide inside a longer one.
    assert not _mentions("[--rates 0,0.2] [--recurrent-rate R] [--output O]", "--rate")
    assert not _mentions("[--out DIR]", "-o")
    assert _mentions("[-o|--output OUTPUT] [--rate R]", "-o")
    assert _mentions("`--rate` (default 0.3)", "--rate")


def test_slug_follows_github():
    assert _slug("Models from strangers: what `--unsafe` allows") == (
        "models-from-strangers-what---unsafe-allows"
    )
    assert _slug("Does it regularize? `regularize sweep`") == "does-it-regularize-regularize-sweep"
    assert _slug("TensorFlow's log lines") == "tensorflows-log-lines"


@pytest.mark.parametrize(
    ("page", "target"),
    list(_relative_links()),
    ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v,
)
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    where = f"{page.relative_to(ROOT)} links to {target!r}"
    assert resolved.exists(), f"{where}: no such file"
    assert resolved.is_relative_to(ROOT), f"{where}: outside the repository"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{where}: no such heading"


def test_readme_keeps_the_test_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for command in TEST_COMMANDS:
        assert command in lines
