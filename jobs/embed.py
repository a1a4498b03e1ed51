"""Entry point for `ray job submit --working-dir . -- python jobs/embed.py --config configs/...`.

Joins the cluster named by RAY_ADDRESS (set by `ray job submit`), or starts a local Ray.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # --working-dir uploads the project; make its package importable from this script.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipeline.cli import main

    sys.exit(main(["embed", *sys.argv[1:]]))
