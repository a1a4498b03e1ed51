"""The commands that work on an existing output: status, verify, repair, export, vacuum and sync."""

from __future__ import annotations

import argparse
import json

from pipeline.config import StorageConfig
from pipeline.errors import EXIT_FAILED, EXIT_OK


def run_output_command(args: argparse.Namespace) -> int:
    """Run status, verify, repair, export, vacuum or sync as the parsed arguments say; the exit code."""
    storage = StorageConfig(endpoint_url=args.endpoint_url, anon=args.anon)
    if args.command == "status":
        from pipeline.status import output_status
        from pipeline.terminal import status_lines

        status = output_status(args.output, storage)
        print(json.dumps(status, indent=2) if args.json else "\n".join(status_lines(status)))
        return EXIT_OK
    if args.command == "export":
        from pipeline.io.current import export_current

        files, rows = export_current(
            args.output, args.dest, storage, rows_per_file=args.rows_per_file, dead_letters=args.dead_letters
        )
        print(f"export: {rows:,} current rows in {files} files under {args.dest}")
        return EXIT_OK
    if args.command == "sync":
        from pipeline.sync.run import sync_output

        summary = sync_output(
            args.output,
            args.to,
            storage,
            table=args.table,
            batch_rows=args.batch_rows,
            create_index=args.create_index,
            progress=print,
        )
        if args.json:
            print(json.dumps(summary.as_dict()))
        else:
            print(
                f"sync: {summary.inserted:,} inserted, {summary.updated:,} updated, {summary.deleted:,} deleted, "
                f"{summary.unchanged:,} unchanged in {summary.wall_s:.1f} s; {summary.target} holds "
                f"{summary.target_rows:,} rows, as the current view does"
            )
        return EXIT_OK
    if args.command == "vacuum":
        from pipeline.vacuum import vacuum_output

        report = vacuum_output(
            args.output,
            storage,
            keep_generations=args.keep_generations,
            dry_run=args.dry_run,
            wait_s=args.wait_for_lease,
        )
        what = "would delete" if args.dry_run else "deleted"
        print(
            f"vacuum: {what} {len(report.parts)} parts holding {report.rows:,} rows, none of them current "
            f"(kept every part of generations {report.kept_generations})"
        )
        return EXIT_OK
    from pipeline.verify import repair_output, verify_output

    if args.command == "repair" or args.repair:
        repaired = repair_output(args.output, storage, wait_s=args.wait_for_lease)
        for action in repaired.actions:
            print(f"repaired {action}")
        then = "; re-run the job to embed what was withdrawn" if repaired.actions else ""
        print(f"repair: {len(repaired.actions)} changes{then}")
        if args.command == "repair":
            return EXIT_OK
    report = verify_output(args.output, storage, check_inputs=not args.skip_inputs, sample=args.sample)
    for fact in report.facts:
        print(f"ok       {fact}")
    for problem in report.problems:
        print(f"PROBLEM  {problem}")
    print("verify: all guarantees hold" if report.ok else f"verify: {len(report.problems)} problems")
    return EXIT_OK if report.ok else EXIT_FAILED
