"""The documents point at things that exist.

Every relative Markdown link and image of the README, ``docs/*.md`` and the
model cards (``[text](path)``, ``[text](path#anchor)``, ``![alt](path)``,
``[text]: path``) must name a file or folder of the repository, and an
``#anchor`` a heading of the Markdown file it names, by GitHub's rule for a
heading's id. External links (``https:``, ``mailto:``, ...) are not followed:
the tests never touch the network. Every ``deepmask`` command the README
names in its code must exist (its ``--help`` exits 0), and every script under
``benchmarks/`` that a document names must be there. A renamed heading, a
moved file or a dropped command fails here with the file, the link and what
is missing.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from deepmask_cli.cli.main import main as deepmask

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = sorted([README, *(ROOT / "docs").glob("*.md"), *(ROOT / "weights").glob("*/MODEL_CARD.md")])

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
#: ``[text](target)`` and ``![alt](target)``; the target may be ``<...>`` and carry a "title".
_LINK = re.compile(r"!?\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(?P<target><[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)")
#: A reference definition, ``[label]: target``.
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(?P<target><[^>]*>|\S+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def outside_code(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` of ``path`` outside fenced code blocks."""
    lines, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((n, line))
    return lines


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """:func:`outside_code` with inline code spans blanked (a link in code is not a link)."""
    return [(n, _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)) for n, line in outside_code(path)]


def code_text(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)``: each line of a fenced block, and each inline code span."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif fenced:
            out.append((n, line))
        else:
            out.extend((n, m.group(2)) for m in _INLINE_CODE.finditer(line))
    return out


def slug(heading: str) -> str:
    """GitHub's id of a heading: its rendered text (code spans, links and
    emphasis reduced to their text) lowercased, every character but letters,
    digits, spaces, ``-`` and ``_`` dropped, spaces made ``-``."""
    text = _INLINE_CODE.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers (not snake_case)
    text = text.strip().lower()
    kept = "".join(c for c in text
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """The ids a link may name in ``path``: each heading's slug (a repeated
    one numbered ``-1``, ``-2``, ... as GitHub numbers them) and explicit
    ``<a name=...>`` / ``<a id=...>`` anchors."""
    seen: dict[str, int] = {}
    ids = set()
    for _, line in outside_code(path):
        ids.update(_HTML_ID.findall(line))
        m = _HEADING.match(line)
        if m:
            base = slug(m.group("text"))
            k = seen.get(base, 0)
            seen[base] = k + 1
            ids.add(base if k == 0 else f"{base}-{k}")
    return frozenset(ids)


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link, image and reference definition of ``path``."""
    out = []
    for n, line in prose_lines(path):
        out.extend((n, m.group("target")) for m in _LINK.finditer(line))
        m = _REFERENCE.match(line)
        if m:
            out.append((n, m.group("target")))
    return out


def link_problem(doc: Path, target: str) -> str | None:
    """What is wrong with ``target``, a link of ``doc``, or ``None``."""
    target = target.strip("<>")
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # external: not followed
    where, _, anchor = target.partition("#")
    where = unquote(where.split("?", 1)[0])
    dest = doc if not where else (ROOT / where.lstrip("/") if where.startswith("/") else doc.parent / where)
    dest = Path(dest).resolve()
    if not dest.is_relative_to(ROOT):
        return f"points outside the repository ({dest})"
    if not dest.exists():
        return f"no such file {rel(dest)}"
    if anchor:
        if dest.suffix.lower() != ".md" or dest.is_dir():
            return None  # an anchor into a non-Markdown file (a line of code, ...) is not checked
        if unquote(anchor) not in anchors(dest):
            return f"{rel(dest)} has no heading #{anchor} (its ids: {', '.join(sorted(anchors(dest)))})"
    return None


def test_the_documents_are_found():
    names = {rel(p) for p in DOCUMENTS}
    assert {"README.md", "docs/training.md", "docs/getting-coco.md"} <= names, sorted(names)
    assert any(n.startswith("weights/") for n in names), "no weights/*/MODEL_CARD.md found"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=rel)
def test_relative_links_resolve(doc):
    broken = [f"{rel(doc)}:{n}: ({target}): {problem}"
              for n, target in links(doc) if (problem := link_problem(doc, target)) is not None]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert slug("Scaling out with torchrun") == "scaling-out-with-torchrun"
    assert slug("SharpMask refinement (`--refine --init`)") == "sharpmask-refinement---refine---init"
    assert slug("`deepmask propose` options") == "deepmask-propose-options"
    assert slug("The feature cache (`--cache-features`)") == "the-feature-cache---cache-features"
    assert slug("CPU with AVX-512, VNNI and bf16 (no AVX-VNNI): the shipped weights") == \
        "cpu-with-avx-512-vnni-and-bf16-no-avx-vnni-the-shipped-weights"
    assert slug("Which weights, which preset?") == "which-weights-which-preset"
    assert slug("`score_live` and **bold**") == "score_live-and-bold"


def test_a_broken_link_fails():
    """The checker itself: a missing file and a missing heading are reported."""
    doc = ROOT / "docs" / "training.md"
    assert link_problem(doc, "no-such-file.md") == "no such file docs/no-such-file.md"
    assert "has no heading #no-such-heading" in link_problem(doc, "faq.md#no-such-heading")
    assert link_problem(doc, "faq.md#on-a-gpu") is None
    assert link_problem(doc, "https://example.invalid/nowhere") is None


#: ``deepmask CMD`` and ``python -m deepmask_cli CMD`` in code.
_COMMAND = re.compile(r"(?:^|[\s;&|(`$])(?:deepmask|-m deepmask_cli)\s+([a-z][a-z0-9-]*)(?=\s|$)")


def readme_commands() -> dict[str, int]:
    """``{command: first README line naming it}`` from the README's code."""
    found: dict[str, int] = {}
    for n, code in code_text(README):
        for name in _COMMAND.findall(code):
            found.setdefault(name, n)
    return found


COMMANDS = readme_commands()


def test_readme_names_commands():
    assert {"propose", "train", "eval"} <= set(COMMANDS), f"README's code names only {sorted(COMMANDS)}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_command_exists(name):
    result = CliRunner().invoke(deepmask, [name, "--help"])
    assert result.exit_code == 0, (f"README.md:{COMMANDS[name]}: `deepmask {name}` is not a command of deepmask "
                                   f"(`deepmask {name} --help` exits {result.exit_code}: {result.output.strip()[-300:]})")


_SCRIPT = re.compile(r"(?<![\w/.-])benchmarks/[\w.-]+\.(?:py|sh)\b")


def test_named_benchmark_scripts_exist():
    missing = []
    for doc in DOCUMENTS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            missing += [f"{rel(doc)}:{n}: {s} does not exist" for s in _SCRIPT.findall(line) if not (ROOT / s).is_file()]
    assert not missing, "\n".join(missing)
