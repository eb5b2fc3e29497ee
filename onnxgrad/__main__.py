"""The ``onnxgrad`` command (console script and ``python -m onnxgrad``).

Each verb is one function ``main(argv: list[str]) -> int`` that owns its argument parser (built
with ``prog="onnxgrad <verb>"`` so ``--help`` reads right). :data:`VERBS` names where each lives;
its module is imported only when the verb runs, so a slow or optional dependency of one verb
never slows down or breaks the others. Adding a verb is a module with that function and one
line in :data:`VERBS`. A verb whose module does not exist yet says so and exits 2.

Exit codes: 0 success, 2 usage errors and bad input (one line on stderr, no traceback),
130 interrupted. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

VerbMain = Callable[[list[str]], "int | None"]


@dataclass(frozen=True)
class Verb:
    target: str | VerbMain  # "package.module:function", or the function itself
    summary: str  # one line for `onnxgrad --help`
    extra: str | None = None  # the pip extra that installs the verb's optional dependencies


def inspect_main(argv: list[str]) -> int:
    """``onnxgrad inspect FILE.onnx``: summary (or full dump), and pictures of the graph."""
    from .inspector import (
        InspectError,
        find_dot,
        format_graph,
        load_model,
        summary,
        to_dot,
        write_svg,
    )
    from .runtime.files import atomic_write

    parser = argparse.ArgumentParser(
        prog="onnxgrad inspect",
        description="Summarize an ONNX model: inputs and outputs, state mapping, node counts by op "
        "and origin, parameters, FLOPs, largest intermediate tensors. Works on any .onnx file; "
        "origins are 'unknown' for models onnxgrad did not make.",
    )
    parser.add_argument("file", metavar="FILE.onnx", help="the model to inspect")
    parser.add_argument("--nodes", action="store_true",
                        help="print the full typed text dump, one line per node, instead of the "
                        "summary")
    parser.add_argument("--dot", metavar="OUT.dot",
                        help="write a Graphviz DOT picture (nodes coloured by origin, clustered by "
                        "module)")
    parser.add_argument("--svg", metavar="OUT.svg",
                        help="render the picture to SVG (needs Graphviz's 'dot' on PATH)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip onnx.checker validation (for models newer than the installed "
                        "onnx)")
    args = parser.parse_args(argv)
    try:
        # Fail before printing or writing anything.
        if args.svg:
            find_dot()
        for out in (args.dot, args.svg):
            if out and not os.path.isdir(os.path.dirname(out) or "."):
                raise InspectError(f"cannot write {out}: no such directory")
        model = load_model(args.file, check=not args.no_check)
        print(format_graph(model) if args.nodes else summary(model))
        dot = to_dot(model) if args.dot or args.svg else ""
        for out, write in ((args.dot, lambda p: atomic_write(p, dot.encode())),
                           (args.svg, lambda p: write_svg(dot, p))):
            if out:
                try:
                    write(out)
                except OSError as exc:  # a read-only or full directory
                    raise InspectError(f"cannot write {out}: {exc.strerror or exc}") from exc
                print(f"wrote {out}", file=sys.stderr)
    except InspectError as exc:
        return _fail("inspect", str(exc))
    return 0


# Where each verb lives; demo and bench are written by their owners in their own modules.
VERBS: dict[str, Verb] = {
    "demo": Verb("onnxgrad.demo:main",
                 "train a small network on handwritten digits with a compiled step, export the "
                 "step and verify it in another runtime", extra="demo"),
    "inspect": Verb(inspect_main,
                    "summarize an .onnx file (--nodes: full dump; --dot/--svg: picture)"),
    "bench": Verb("onnxgrad.bench:main", "measure training-step speed and print ratios"),
    "train-graph": Verb("onnxgrad.training:train_graph_main",
                        "turn an inference .onnx model into a standard-ONNX training step"),
    "verify": Verb("onnxgrad.verify:main",
                   "loop an exported training step in every ONNX runtime installed and compare "
                   "each step with ONNX Runtime"),
    "launch": Verb("onnxgrad.distributed.launch:main",
                   "run a training script on N processes with MPI (mpiexec)", extra="distributed"),
}

EXIT_USAGE = 2


def _fail(verb: str, message: str) -> int:
    print(f"onnxgrad {verb}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _os_error(exc: OSError) -> str:
    from .runtime.files import FileWriteError

    if isinstance(exc, FileWriteError) or not exc.filename:
        return str(exc)
    return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"


def _top_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="onnxgrad",
        description="onnxgrad: PyTorch-style autograd whose only language is standard ONNX.",
        epilog="Run 'onnxgrad VERB --help' for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"onnxgrad {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, verb in VERBS.items():
        # add_help=False: the verb's own parser answers `onnxgrad VERB --help`.
        verbs.add_parser(name, help=verb.summary, add_help=False)
    return parser


def _load(name: str, verb: Verb) -> VerbMain | str:
    """The verb's function, or a one-line reason it cannot run."""
    if callable(verb.target):
        return verb.target
    module_name, _, function = verb.target.partition(":")
    if importlib.util.find_spec(module_name) is None:
        return (f"not available yet: this version of onnxgrad has no '{name}' "
                f"({module_name} is not implemented)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # an optional dependency of the verb, not the verb
        install = f"pip install 'onnxgrad[{verb.extra}]'" if verb.extra else f"pip install {exc.name}"
        return f"needs the Python package '{exc.name}': {install}"
    main = getattr(module, function, None)
    if not callable(main):
        return f"not available yet: {module_name} has no {function}(argv) function"
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``onnxgrad`` command line; returns the exit code (never raises SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The verb is the first word that is not an option; everything after it belongs to the verb.
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    try:
        _top_parser().parse_args(argv[: at + 1])  # --help, --version, missing or unknown verb
        name, rest = argv[at], argv[at + 1:]
        found = _load(name, VERBS[name])
        if isinstance(found, str):
            if "-h" in rest or "--help" in rest:
                print(f"usage: onnxgrad {name} ...\n\n{VERBS[name].summary}\n\n({found})")
                return 0
            return _fail(name, found)
        code = found(rest)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2), a verb's sys.exit
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python itself would
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `onnxgrad inspect --nodes m.onnx | head`: the reader left; not an error worth a trace.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A read-only folder, a folder as the output file, a full disk: the user's file system,
        # not a bug, so one line naming the path (runtime.files words its own errors).
        return _fail(argv[at] if at < len(argv) else "", _os_error(exc))
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
