"""README stays true: CI runs its test command verbatim, and every CLI flag is documented."""

import re
from pathlib import Path

from minitorch_infer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_cli_flag_is_in_the_readme():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, sub in subparsers.items():
        assert f"`{name}" in README, f"subcommand {name} is not documented"
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and f"`{flag}" not in README:
                    missing.append(f"{name} {flag}")
    assert not missing, f"undocumented flags: {missing}"


def test_the_graph_excerpt_is_what_the_tracer_prints(story_model):
    excerpt = re.search(r"The traced story graph, one layer of it:\n\n```\n(.*?)\n```", README, re.S).group(1)
    traced = {line.strip() for line in str(story_model.trace()).splitlines()}
    for line in excerpt.splitlines():
        assert line == "..." or line in traced, line
