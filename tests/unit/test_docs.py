"""The documentation stays a router whose links all land inside the repository."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 200

# [text](target) and ![alt](target), the target optionally in <...> and followed by a "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]"  # [text], one level of nested brackets allowed
    r"\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"  # (target "title")
)
# [label]: target (reference-style definitions)
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where links are not links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(CODE_SPAN.sub("", line))
    return "\n".join(kept)


def relative_links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    links = []
    for target in targets:
        target = target.strip("<>").strip()
        if not target or target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        links.append(target)
    return links


def resolve(source: Path, target: str) -> Path:
    return (source.parent / unquote(target.split("#", 1)[0])).resolve()


def test_markdown_files_exist():
    files = markdown_files()
    assert README.is_file()
    assert len(files) > 1, "docs/ holds no markdown files"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    missing = [link for link in relative_links(path) if not resolve(path, link).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing paths: {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_repository(path):
    outside = [
        link for link in relative_links(path) if not resolve(path, link).is_relative_to(ROOT)
    ]
    assert not outside, f"{path.relative_to(ROOT)} links outside the repository: {outside}"


def test_link_extraction():
    text = (
        'See [a](docs/a.md#x), ![img](img/b.png "t"), [ext](https://x.org), [m](mailto:a@b),\n'
        "[self](#top), `[code](not/a/link.md)`\n```\n[fenced](not/a/link.md)\n```\n"
        "[ref]: ../c.md\n"
    )
    page = ROOT / "docs" / "page.md"
    found = INLINE_LINK.findall(prose(text)) + REFERENCE_LINK.findall(prose(text))
    assert found == ["docs/a.md#x", "img/b.png", "https://x.org", "mailto:a@b", "#top", "../c.md"]
    assert resolve(page, "../../outside.md").is_relative_to(ROOT) is False
    assert resolve(page, "img/b.png#frag") == ROOT / "docs" / "img" / "b.png"


def test_citation_cff_parses():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert isinstance(citation, dict)
    for key in ("cff-version", "title", "license"):
        assert citation.get(key), f"CITATION.cff lacks {key}"
    assert str(citation["cff-version"]).startswith("1.2")


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_test_a_guarantee_names_exists():
    # docs/reliability.md names the test behind each guarantee: `path::test` or `::test`
    # (a test in the file named just before it).
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = path or current
        assert current, f"::{name} follows no test file"
        named.append((current, name))
    assert len(named) >= 10, named
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
