"""Rewrites the README's "Config reference" table from configs/default.py's comments.

`python scripts/readme_config_reference.py` after adding or changing a config key;
tests/test_configs.py fails while the table and the comments disagree.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_configs import reference_rows  # noqa: E402  (the one definition of a row)


def main() -> None:
  path = os.path.join(ROOT, "README.md")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  start = lines.index("## Config reference")
  rows = [i for i in range(start, len(lines)) if re.match(r"\| `[\w.]+` \|", lines[i])]
  first, last = rows[0], rows[-1]
  lines[first:last + 1] = list(reference_rows().values())
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


if __name__ == "__main__":
  main()
