"""Entry point of a scheduled refresh: `ray job submit --working-dir . -- python jobs/refresh.py --config ...`.

Embeds what changed in the input since the last run as a new generation of the output (new and
rewritten shards; deleted ones recorded), or, when nothing changed, says so in seconds. Killed at any
point, the next scheduled run finishes the interrupted generation first. Same flags as `embed`.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # --working-dir uploads the project; make its package importable from this script.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipeline.cli import main

    sys.exit(main(["embed", "--refresh", *sys.argv[1:]]))
