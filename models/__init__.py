"""Model files that ship with the package: the story model (TinyStories-656K, 2.6 MB) in `story/`.

Installed as `minitorch_infer.models` so that a regular install carries the default model; other models
are fetched into this folder (git-ignored) by `minitorch-infer fetch`.
"""
