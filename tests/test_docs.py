"""The documentation points at things that exist.

Every relative link of README.md, BENCHMARKS.md and docs/*.md names an existing file, and its
``#anchor`` a heading of that file (GitHub's heading anchors); every ``docs/<page>.md, "Heading"``
reference in the code names an existing page and heading; no file cites the team's specification,
which is not in the repository; and the README's map of the code names folders and files that
exist.
"""
import re
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_REFERENCE = re.compile(r'docs/([\w-]+\.md)(?:, "([^"]+)")?')
SPLIT_REFERENCE = re.compile(r'docs/[\w-]+\.md, "[^"]*$')  # the heading must stay on one line
TEXT_SUFFIXES = {".py", ".md", ".txt", ".sh", ".yaml", ".yml", ".ini", ".cfg", ".toml"}


def prose_lines(text):
    """``(line_number, line)`` outside fenced code blocks, with inline code spans blanked."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", "``", line)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores
    kept), spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings, a repeated heading getting ``-1``, ``-2``, …"""
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def headings(path):
    return {m.group(1) for _, line in prose_lines(path.read_text(encoding="utf-8"))
            if (m := re.match(r"#{1,6}\s+(.*?)\s*$", line))}


def repository_files():
    """The project's text files: git's list where there is one, else a walk of the tree."""
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                               check=True, timeout=60).stdout.splitlines()
        files = [ROOT / n for n in names]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", ".venv-anytorch", "output", "__pycache__"}
        files = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return [p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file()]


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for page in PAGES:
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                file = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not file.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                    broken.append(f"{where} (no heading with that anchor in {file.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_in_docs_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).name for _, line in prose_lines(readme) for t in LINK.findall(line)}
    unlinked = [p.name for p in PAGES[2:] if p.name not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_code_references_to_docs_name_existing_pages_and_headings():
    broken = []
    for file in repository_files():
        if file.suffix == ".md":
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if SPLIT_REFERENCE.search(line):
                broken.append(f"{file.relative_to(ROOT)}:{number}: a heading split over two lines")
            for page, heading in CODE_REFERENCE.findall(line):
                doc = ROOT / "docs" / page
                where = f"{file.relative_to(ROOT)}:{number}: docs/{page}"
                if not doc.is_file():
                    broken.append(f"{where} (no such page)")
                elif heading and heading not in headings(doc):
                    broken.append(f'{where}, "{heading}" (no such heading)')
    assert not broken, "references to docs/ that do not resolve:\n" + "\n".join(broken)


def test_nothing_cites_the_specification_outside_the_repository():
    cited = ("DESIGN" + " §", "DESIGN" + ".md")  # spelled apart so that this file does not find itself
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in repository_files()
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if any(c in line for c in cited)]
    assert not hits, f"cites a document users do not have (say it, or point to docs/): {hits}"


def readme_map():
    """``{folder: [entries]}`` of the README's map: the first word of a line is a folder (a
    continuation line is indented), and the file and folder names of the rest outside parentheses
    are its entries."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## Map of the code\n+```\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no '## Map of the code' section with a code block"
    entries, folder = {}, None
    for line in block.group(1).splitlines():
        rest = line
        if not line.startswith(" "):
            folder, _, rest = line.partition(" ")
            entries.setdefault(folder, [])
        rest = re.sub(r"\([^)]*\)", "", rest)
        entries[folder] += re.findall(r"(?<![\w/.])([\w-]+(?:\.(?:py|sh|md)|/))(?=[,\s]|$)", rest)
    return entries


def test_readme_map_matches_the_tree():
    missing = []
    for folder, names in readme_map().items():
        for name in [""] + names:
            if not (ROOT / folder / name).exists():
                missing.append(folder + name)
    assert not missing, f"the README's map names what is not there: {missing}"
