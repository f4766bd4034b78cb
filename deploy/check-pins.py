"""Fails an image build when pip installed a distribution that no constraints file pins.

Usage: python check-pins.py CONSTRAINTS... (run inside the image, after pip install).
The stack's Python set is what the constraints say, not what a fresh resolve brings that
day (celery 5.7.0 broke the CeleryExecutor exactly that way).
"""

import re
import sys
from importlib.metadata import distributions

# Built here from the repository, or the installer itself.
OWN = {"loraflow", "loraflow-trainer", "pip", "setuptools", "wheel"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


pins: dict[str, str] = {}
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name.split("[")[0])] = version.strip()

unpinned, drifted = [], []
for dist in distributions():
    name = norm(dist.metadata["Name"])
    if name in OWN:
        continue
    if name not in pins:
        unpinned.append(f"{dist.metadata['Name']}=={dist.version}")
    elif pins[name] != dist.version.split("+")[0]:
        drifted.append(f"{dist.metadata['Name']}=={dist.version} (pinned {pins[name]})")

if unpinned or drifted:
    sys.exit(
        "loraflow: the image holds packages its constraints do not pin: "
        + ", ".join(sorted(unpinned + drifted))
        + "; pin them in deploy/constraints-stack.txt (its header says how to re-resolve)."
    )
print(f"check-pins: all {sum(1 for _ in distributions())} installed distributions are pinned")
