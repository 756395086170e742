"""The docs hold together: links resolve, results files are indexed (plain pytest, no ComfyUI, fast).

* every ``docs/results/...`` file that README.md or docs/*.md names (as a link or as a path in
  the text) exists;
* every file in docs/results/ (not archive/, not README.md) is listed in docs/results/README.md;
* every relative link in README.md, docs/*.md and docs/results/README.md resolves to an existing
  file, and a ``#fragment`` into a markdown file names one of its headings (GitHub's slugs).
  Links into web/docs/ (the node help pages) and to docs/code-notes.md are checked only once
  they exist (other parts of the pack create them).
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
RESULTS = DOCS / "results"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
# Pages that other parts of the pack create: links to them are checked once they exist.
PENDING = (REPO / "web" / "docs", DOCS / "code-notes.md")
RESULTS_PATH = re.compile(r"docs/results/([A-Za-z0-9_.\-/]+\.(?:json|png|jpg))")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md")), RESULTS / "README.md"]


def strip_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in strip_code_blocks(md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(md: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(strip_code_blocks(md.read_text(encoding="utf-8")))]


def test_pages_exist():
    for name in ("README.md", "method.md", "proving-ground.md", "robustness.md", "speed.md",
                 "decisions.md"):
        assert (DOCS / name).is_file(), name
    assert (RESULTS / "README.md").is_file()


def test_every_results_file_a_page_names_exists():
    missing = []
    for md in pages():
        text = md.read_text(encoding="utf-8")
        for rel in RESULTS_PATH.findall(text):
            if not (RESULTS / rel).is_file():
                missing.append(f"{md.relative_to(REPO)}: docs/results/{rel}")
        for target in links(md):
            path = (md.parent / target.split("#")[0]).resolve()
            if RESULTS in path.parents and not path.exists():
                missing.append(f"{md.relative_to(REPO)}: {target}")
    assert not missing, missing


def test_every_results_file_is_in_the_index():
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    unlisted = [p.name for p in sorted(RESULTS.iterdir())
                if p.is_file() and p.name != "README.md" and f"`{p.name}`" not in index]
    assert not unlisted, f"add these to docs/results/README.md: {unlisted}"
    archive = RESULTS / "archive"
    if archive.is_dir():
        unlisted = [p.name for p in sorted(archive.iterdir()) if p.is_file() and p.name not in index]
        assert not unlisted, f"say in docs/results/README.md what these were: {unlisted}"


def test_every_relative_link_resolves():
    broken = []
    for md in pages():
        for target in links(md):
            if re.match(r"[a-z]+:", target) or target.startswith("#") and not target[1:]:
                continue  # http:, https:, mailto:
            path_part, _, fragment = target.partition("#")
            path = (md.parent / path_part).resolve() if path_part else md
            if any((path == p or p in path.parents) and not p.exists() for p in PENDING):
                continue  # written by another part of the pack; checked once it exists
            if not path.exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{md.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_is_short_and_has_no_issue_numbers():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert not re.search(r"\b(issue|session) \d+", text, re.I)
