#!/usr/bin/env python3
"""Every relative link in the repository's Markdown resolves: `](path)` names an existing
file or directory, and `](path#anchor)` or `](#anchor)` a heading of that file, by GitHub's
rule (lower-case, punctuation dropped, spaces to `-`, `-1`, `-2`… for repeats). The docs
were split into docs/ and point at each other; this keeps them pointing somewhere."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path):
    seen, out, fence = {}, set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6} +(.*?) *#*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).lower().replace("`", ""))
            slug = text.replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def main():
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    bad = []
    for name in files:
        path = ROOT / name
        fence = False
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
            if fence:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                if not dest.exists():
                    bad.append(f"{name}:{no}: {target}: no such file")
                elif anchor and dest.is_file() and anchor not in anchors(dest):
                    bad.append(f"{name}:{no}: {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    for b in bad:
        print(b, file=sys.stderr)
    print(f"{len(files)} Markdown files, {'all links resolve' if not bad else f'{len(bad)} broken links'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
