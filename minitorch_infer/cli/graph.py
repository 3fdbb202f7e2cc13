"""minitorch-infer graph: draw the model's graph (as traced and as optimised) with Graphviz, or print it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_model_arguments, load_model, note

HELP = "write the model's graph as Graphviz dot (and SVG/PNG where `dot` exists), or print its text form"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", default="graph.dot",
                        help="the optimised graph's .dot path; the traced one goes beside it as .traced.dot")
    parser.add_argument("--stage", choices=["traced", "optimised", "both"], default="both")
    parser.add_argument("--fold-layers", action="store_true", help="draw runs of identical layers once")
    parser.add_argument("--show-params", action="store_true", help="draw weights as nodes too")
    parser.add_argument("--no-memory", action="store_true", help="leave out the memory-plan overlay")
    parser.add_argument("--format", choices=["svg", "png", "none"], default="svg",
                        help="also render with `dot` when it is installed (default: svg)")
    parser.add_argument("--each-pass", metavar="DIR", default=None,
                        help="also write the graph after every pass into DIR (00_traced.dot, 01_fuse_qkv.dot, ...)")
    parser.add_argument("--text", action="store_true", help="print the optimised graph's text form instead")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    if args.text:
        print(model.graph)
        note(args, str(model.pass_report))
        note(args, model.memory_plan.summary())
        return 0
    stages = ("traced", "optimised") if args.stage == "both" else (args.stage,)
    for line in dump_traced_and_optimised(model, args.output, stages, fold_layers=args.fold_layers,
                                          show_params=args.show_params, memory=not args.no_memory,
                                          render=None if args.format == "none" else args.format):
        note(args, line)
    if args.each_pass:
        from ..passes import PassManager

        PassManager([model.weight_pass, *model.passes], dump_dot_dir=args.each_pass).run(model.trace(), model.weights)
        note(args, f"wrote the graph after each pass into {args.each_pass}/")
    return 0


def dump_traced_and_optimised(model, path: str, stages=("traced", "optimised"), fold_layers: bool = False,
                              show_params: bool = False, memory: bool = True, render: str | None = "svg") -> list[str]:
    """Write the requested stages; return lines saying what was written (and how to render, without `dot`)."""
    from ..ir.dot import dot_available, render_hint, write_dot

    optimised_path = Path(path)
    graphs = {
        "optimised": (optimised_path, model.graph, model.memory_plan if memory else None),
        "traced": (optimised_path.with_suffix(".traced.dot"), model.trace(), None),
    }
    lines = []
    for stage in stages:
        target, graph, plan = graphs[stage]
        written = write_dot(graph, target, plan=plan, show_params=show_params, fold_layers=fold_layers,
                            render=render if dot_available() else None)
        lines.append(f"{stage} graph: " + ", ".join(str(p) for p in written))
        if render and not dot_available():
            lines.append(render_hint(target))
    return lines
