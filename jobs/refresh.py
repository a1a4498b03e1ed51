"""Entry point of a scheduled refresh: `ray job submit --working-dir . -- python jobs/refresh.py --config ...`.

Embeds what changed in the input since the last run as a new generation of the output (new and
rewritten shards; deleted ones recorded), or, when nothing changed, says so in seconds. Killed at any
point, the next scheduled run finishes the interrupted generation first. Same flags as `embed`, plus
`--sync-to URL [--sync-table NAME]`: after a successful refresh, bring that target to the output's
current view (`neobert-pipeline sync`).
"""

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from pipeline.cli import build_parser, embed_config
    from pipeline.cli import main as cli

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--sync-to", metavar="URL")
    extra.add_argument("--sync-table", metavar="NAME")
    sync, embed_args = extra.parse_known_args(argv)
    code = cli(["embed", "--refresh", *embed_args])
    if code != 0 or not sync.sync_to:
        return code
    config = embed_config(build_parser().parse_args(["embed", *embed_args]))
    command = ["sync", config.output, "--to", sync.sync_to]
    command += ["--table", sync.sync_table] if sync.sync_table else []
    command += ["--endpoint-url", config.storage.endpoint_url] if config.storage.endpoint_url else []
    return cli(command)


if __name__ == "__main__":
    # --working-dir uploads the project; make its package importable from this script.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
