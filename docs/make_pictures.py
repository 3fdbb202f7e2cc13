"""Draw the README's picture: the story model's optimised graph, as docs/story-graph.svg and .png.

Run after changing the passes or the drawing:  python docs/make_pictures.py
"""

import shutil
import tempfile
from pathlib import Path

import minitorch_infer
from minitorch_infer.ir.dot import dot_available, render_hint, write_dot

DOCS = Path(__file__).resolve().parent


def main() -> None:
    if not dot_available():
        raise SystemExit(render_hint(DOCS / "story-graph.dot"))
    model = minitorch_infer.load("story")
    # The .dot itself is a by-product; only the pictures are kept, so it is written to a scratch directory.
    with tempfile.TemporaryDirectory() as scratch:
        for fmt in ("svg", "png"):
            *_, picture = write_dot(model.graph, Path(scratch) / "story-graph.dot", plan=model.memory_plan,
                                    fold_layers=True, render=fmt, title="the story model, optimised")
            shutil.move(picture, DOCS / picture.name)
            print(f"wrote {DOCS / picture.name}")


if __name__ == "__main__":
    main()
