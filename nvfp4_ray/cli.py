"""``nvfp4-ray``: a thin shell over the library.

Exit codes: 0 done; 2 bad input or configuration (nothing was started where it could be
checked first); 3 failed during the run (the same command resumes). The last line on
stdout is always one JSON object: the summary, or the error. The summary stays one short
line: the quality report's per-Linear figures are left to the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from importlib import metadata

from nvfp4_ray.config import QuantizeConfig
from nvfp4_ray.errors import EXIT_INPUT, EXIT_OK, EXIT_RUN, InputError, JobError
from nvfp4_ray.io.storage import redact

_POSITIONAL = ("source", "dest")


def add_config_options(parser: argparse.ArgumentParser, positional: bool = True, model=QuantizeConfig) -> None:
    """One flag per field of ``model`` (``--config FILE.yaml`` may hold any of them)."""
    parser.add_argument("--config", metavar="FILE.yaml", help="job configuration file; flags override it")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        help_text = field.description
        if name in getattr(model, "POSITIONAL", _POSITIONAL):
            if positional:
                parser.add_argument(name, nargs="?", help=help_text)
            continue
        if annotation is bool:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif origin is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), default=None, help=help_text)
        elif args and typing.get_origin(args[0]) is list:
            metavar = (field.json_schema_extra or {}).get("metavar", name.upper())
            parser.add_argument(flag, nargs="+", action="extend", default=None, metavar=metavar, help=help_text)
        else:
            base = args[0] if args else annotation
            parser.add_argument(flag, type=base if base in (int, float) else str, default=None, help=help_text)


def config_from_args(args: argparse.Namespace, model=QuantizeConfig):
    values = {name: getattr(args, name, None) for name in model.model_fields}
    return model.build(values, args.config)


def _finish(summary: dict, code: int) -> int:
    print(json.dumps(summary, default=str), flush=True)
    return code


def run_guarded(action, log_format: str = "text") -> int:
    """Run ``action()`` (returning a summary dict) and map failures to exit codes."""
    try:
        return _finish(action(), EXIT_OK)
    except InputError as exc:
        message = redact(str(exc))
        code = EXIT_INPUT
    except JobError as exc:
        message = redact(str(exc))
        code = EXIT_RUN
    except OSError as exc:  # storage failed under the driver, or under a task (unit_tasks.task_error)
        message = redact(f"storage error: {exc}; run the same command again to resume")
        code = EXIT_RUN
    except KeyboardInterrupt:
        message, code = "interrupted; run the same command again to resume", EXIT_RUN
    except Exception as exc:  # a bug or an unexpected environment problem: resumable
        import traceback

        traceback.print_exc(file=sys.stderr)
        message = redact(f"internal error: {type(exc).__name__}: {exc}")
        code = EXIT_RUN
    print(f"nvfp4-ray: error: {message}", file=sys.stderr, flush=True)
    return _finish({"status": "failed", "exit_code": code, "error": message}, code)


def _quantize(args: argparse.Namespace) -> int:
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.pipeline.job import run_quantize

    def action():
        config = config_from_args(args)
        return _short(run_quantize(config, Events(config.log_format)))

    return run_guarded(action)


def _demo(args: argparse.Namespace) -> int:
    from nvfp4_ray.demo import run_demo

    return run_guarded(lambda: _short(run_demo(args.dest, args.log_format or "text")))


def _short(summary: dict) -> dict:
    """The summary line with the quality report's headline only: its SQNR for each Linear
    (210 of them on SmolLM2, 20 KB of JSON) stays in DEST's manifest.json under ``quality``."""
    from nvfp4_ray.quality.evaluate import headline

    if summary.get("quality") is None:  # not evaluated, or an unchanged run
        return summary
    return {**summary, "quality": headline(summary["quality"])}


def _prepare_calibration(args: argparse.Namespace) -> int:
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.prepare import PrepareOptions, prepare_calibration

    def action():
        options = config_from_args(args, PrepareOptions)
        return prepare_calibration(options, Events(options.log_format))

    return run_guarded(action)


def _evaluate(args: argparse.Namespace) -> int:
    from nvfp4_ray.pipeline.events import Events
    from nvfp4_ray.quality.evaluate import EvaluateOptions, run_evaluate

    def action():
        options = config_from_args(args, EvaluateOptions)
        return run_evaluate(options, Events(options.log_format))

    return run_guarded(action)


def _rollback(args: argparse.Namespace) -> int:
    from nvfp4_ray.io.storage import Store
    from nvfp4_ray.io.versions import rollback

    return run_guarded(lambda: rollback(Store(args.dest), args.version))


def _export(args: argparse.Namespace) -> int:
    from nvfp4_ray.io.export import export

    return run_guarded(lambda: export(args.dest, args.target))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The program's parser, and each command's own."""
    from nvfp4_ray.prepare import PrepareOptions
    from nvfp4_ray.quality.evaluate import EvaluateOptions

    parser = argparse.ArgumentParser(prog="nvfp4-ray", description="Quantize Hugging Face checkpoints to NVFP4 on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('nvfp4-ray')}")
    commands = parser.add_subparsers(dest="command", required=True)
    quantize = commands.add_parser("quantize", help="quantize SOURCE into DEST")
    add_config_options(quantize)
    quantize.set_defaults(handler=_quantize)
    demo = commands.add_parser(
        "demo", help="quantize the bundled SmolLM2-135M-Instruct, print a summary and its quality report"
    )
    demo.add_argument("dest", nargs="?", default=None, help="output directory (default: ./nvfp4-demo-out)")
    demo.add_argument("--log-format", choices=["text", "json"], default=None)
    demo.set_defaults(handler=_demo)
    prepare = commands.add_parser(
        "prepare-calibration", help="render, sample and tokenize conversations into a calibration Parquet"
    )
    add_config_options(prepare, model=PrepareOptions)
    prepare.set_defaults(handler=_prepare_calibration)
    evaluate = commands.add_parser(
        "evaluate", help="perplexity, top-1 agreement, KL and weight SQNR of QUANT against BASE"
    )
    add_config_options(evaluate, model=EvaluateOptions)
    evaluate.set_defaults(handler=_evaluate)
    rollback = commands.add_parser("rollback", help="make an earlier version kept at DEST current again")
    rollback.add_argument("dest", help="the output directory or URL of earlier runs")
    rollback.add_argument("--version", default=None, help="version to restore (default: the one before the current)")
    rollback.set_defaults(handler=_rollback)
    export = commands.add_parser(
        "export", help="copy exactly the checkpoint committed at DEST (no .nvfp4/, no other version) to TARGET"
    )
    export.add_argument("dest", help="the output directory or URL of a finished run")
    export.add_argument("target", help="an empty or new directory or URL (s3://...) to copy the checkpoint to")
    export.set_defaults(handler=_export)
    return parser, commands.choices


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    if argv and argv[0] in commands:
        # Options may sit between the positionals (`quantize SRC --calibration X DEST`).
        # argparse cannot intermix a parser that has subcommands, so the command's own
        # parser takes the rest of the line.
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:  # -h, --version, or no or an unknown command: argparse answers
        args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
