"""Write docs/rules.md: every rule page, in code order, from the detectors' docstrings.

Run it after editing a rule page (a detector's docstring, or GG000's in gradguard/pages.py):

    python docs/make_rules.py

A test fails while docs/rules.md differs from what this writes. It reads the pages without
importing torch, so it runs in well under a second.
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
RULES_MD = os.path.join(DOCS, "rules.md")


def main(argv: list[str] | None = None) -> int:
    """Write the rules document to the path given (docs/rules.md by default); return 0."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else RULES_MD
    sys.path.insert(0, os.path.dirname(DOCS))  # the gradguard of this checkout, installed or not
    from gradguard.explain import rules_markdown

    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(rules_markdown())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
