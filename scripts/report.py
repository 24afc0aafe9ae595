#!/usr/bin/env python
"""Regenerate a results document (docs/results.md) from run directories; the document is its own template.

    python scripts/report.py docs/results.md                  # rewrite the blocks whose runs are here, in place
    python scripts/report.py docs/results.md --root /data/fipa --out /tmp/results.md
    python scripts/report.py docs/results.md --only results/regression_2d   # just the blocks of one study
    python scripts/report.py docs/results.md --strict         # fail unless every block was made from runs
    python scripts/report.py docs/results.md --check          # fail if regenerating would change the document

Each `<!-- report:table ... -->` or `<!-- report:figure ... -->` block (see fipa/report.py for its options) is
rewritten from the completed runs below its `runs:` directories, which are relative to --root (default: the
current directory); tables give median [min, max] over seeds with the number of seeds and of stalled seeds, and
every block ends with the commands that made its runs. The prose outside the blocks is kept byte for byte, and
a block whose runs are not here keeps its previous content (listed as kept), so sections can be regenerated as
their studies finish. Figures are written next to the output document, at the block's `out:` path.

Exit status: 0; 1 with --strict when a block was kept, or with --check when the document would change;
2 for a bad block (its line is named) or a missing document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fipa.errors import ConfigError
from fipa.report import regenerate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("document", type=Path, help="the template: a markdown file with report blocks")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default: in place)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the blocks' runs: paths are relative to it")
    parser.add_argument("--only", default=None, metavar="DIR",
                        help="rewrite only the blocks whose runs: name DIR (keep the others as they are)")
    parser.add_argument("--strict", action="store_true", help="fail when a block's runs are missing")
    parser.add_argument("--check", action="store_true", help="write nothing; fail if the document would change")
    args = parser.parse_args(argv)
    if not args.document.is_file():
        parser.exit(2, f"report: {args.document} is not a file\n")
    out = args.out or args.document
    text = args.document.read_text()

    def show(outcome) -> None:
        print(f"report: {args.document}:{outcome.line}: {outcome.note}", file=sys.stderr, flush=True)

    try:
        report, outcomes = regenerate(text, args.root.resolve(), out.resolve().parent, progress=show, only=args.only)
    except ConfigError as error:
        parser.exit(2, f"report: {args.document}: {error}\n")
    kept = [o for o in outcomes if o.runs == 0]
    made = len(outcomes) - len(kept)
    print(f"report: {made} of {len(outcomes)} blocks made from runs, {len(kept)} kept", file=sys.stderr)
    if args.check:
        changed = report != text
        print(f"report: {args.document} {'would change' if changed else 'is up to date'}", file=sys.stderr)
        return 1 if changed else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(out)
    return 1 if args.strict and kept else 0


if __name__ == "__main__":
    sys.exit(main())
