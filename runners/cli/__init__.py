"""The `qwen-edit` command: edit, download, doctor, demo (and bench, runners/bench.py).

A thin runner over the library, one module per concern:
    parser      the command line as tables of flags
    edit        jobs (command line, batch file), the model spec, running them with progress
    run         a ComfyUI workflow JSON, headless
    demo        the tiny random-weight model end to end
    download    the model files from the Hugging Face hub, resumable
    doctor      is this machine ready, and what to fix if not
    checks      what `edit` checks before loading: pictures decoded, model file headers, the device
    saving      where pictures go, in which format, never over a file silently
    output      human text or NDJSON (comfy-cli's `--json` contract), errors and exit codes
    locations   where the models are when no flag says so
Exit codes are documented in output.EXIT_CODES and the README ("Command line"); the library's errors
become them through one table (output.KIND_ERRORS).
"""

from __future__ import annotations

import logging
import sys
import traceback

from .demo import cmd_demo
from .doctor import cmd_doctor
from .download import cmd_download
from .edit import Job, cmd_edit, output_paths, parse_lora, run_jobs
from .output import EXIT_CANCELLED, EXIT_INTERNAL, EXIT_USAGE, CliError, Reporter, cli_error
from .parser import UsageError, build_parser, split_multi_values
from .run import cmd_run

__all__ = ["Job", "build_parser", "main", "output_paths", "parse_lora", "run_jobs"]

# What Ctrl-C interrupted, per command (an edit interrupted between jobs says more: edit.run_jobs).
INTERRUPTED = {
    "download": "interrupted (Ctrl-C); partial downloads are kept and resume",
    "edit": "interrupted (Ctrl-C) before the edit finished; pictures already saved are kept",
    "run": "interrupted (Ctrl-C) before the workflow finished",
    "demo": "interrupted (Ctrl-C) before the demo finished",
    "doctor": "interrupted (Ctrl-C)",
}


def _configure_logging(verbose: int) -> None:
    """-v: the library's INFO logs (backend choice, offload plan, LoRAs) on stderr; -vv: DEBUG. Without
    it warnings still reach stderr through logging's last-resort handler, and libraries with their own
    handlers (huggingface_hub, transformers) are not printed twice."""
    if verbose:
        level = logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own argparse (runners/bench.py)
        from .. import bench

        return bench.main(argv[1:])
    parser = build_parser()
    json_mode = "--json" in argv
    try:
        args, extra = parser.parse_known_args(split_multi_values(argv))
        if extra:
            pictures = [word for word in extra if not word.startswith("-")]
            # A picture after other flags (`a.png -p x b.png`) is still a picture; anything else is not known.
            if args.command != "edit" or len(pictures) != len(extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.images = [*args.images, *pictures]
    except UsageError as exc:
        command = next((a for a in argv if not a.startswith("-")), "qwen-edit")
        print(exc.parser.format_usage().rstrip(), file=sys.stderr)
        return Reporter(command, json_mode).fail(CliError("usage", str(exc), EXIT_USAGE))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # Looked up here, not stored in the parser: the names stay patchable (tests replace a command).
    commands = {
        "edit": cmd_edit, "run": cmd_run, "download": cmd_download, "doctor": cmd_doctor, "demo": cmd_demo
    }  # fmt: skip
    _configure_logging(args.verbose)
    reporter = Reporter(args.command, args.json, stdout=sys.stdout, stderr=sys.stderr)
    saved_stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the NDJSON stream
    try:
        return commands[args.command](args, reporter)
    except KeyboardInterrupt:
        message = INTERRUPTED.get(args.command, "interrupted (Ctrl-C)")
        return reporter.fail(CliError("cancelled", message, EXIT_CANCELLED))
    except Exception as exc:
        error = cli_error(exc)
        if error.exit_code == EXIT_INTERNAL or args.verbose:
            traceback.print_exc(file=sys.stderr)
        return reporter.fail(error)
    finally:
        sys.stdout = saved_stdout


if __name__ == "__main__":
    raise SystemExit(main())
