"""Measuring speculative decoding: `bench --speculate`.

Two prompt sets, each on its model, decoded greedily with and without prompt-lookup speculation:

- input-grounded: SmolLM2 chat asked to repeat, quote, rewrite or summarise a passage given in the prompt,
  where the answer re-uses the prompt's words and drafts from the prompt hold;
- free: story openings for the story model, where nothing in the prompt says what comes next.

Plain and speculative runs of each prompt take turns, run by run, in one process, so a machine whose speed
drifts moves both alike; each speculative run's tokens are compared with the plain run's (greedy: they must
be identical). Reported per set: decode tok/s of both and their ratio, the share of drafted tokens accepted,
and new tokens per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ModelNotFoundError
from ..formats.model_files import find_model
from ..generation.speculative import DEFAULT_DRAFT_MAX, DEFAULT_NGRAM

NEW_TOKENS = 128

_PASSAGES = [
    "The lighthouse stood on a rock at the edge of the bay. Every night the keeper climbed the ninety steps to "
    "light the lamp, and every morning he wrote the weather in a small green book. Ships passing in the dark "
    "saw the light turn once every ten seconds and knew where the rocks were.",
    "Bread needs four things: flour, water, salt and yeast. Mix them into a dough, knead it for ten minutes, "
    "and leave it in a warm place for an hour until it doubles in size. Shape the loaf, let it rise again, and "
    "bake it in a hot oven for about forty minutes until the crust is brown.",
    "The museum opens at nine in the morning and closes at five in the evening, except on Mondays, when it is "
    "closed all day. Tickets cost twelve dollars for adults and six dollars for children. Guided tours start "
    "every hour from the main hall and last forty five minutes.",
    "Honey bees live in colonies of up to sixty thousand bees. The queen lays the eggs, the workers collect "
    "nectar and pollen and build the comb, and the drones mate with new queens. In winter the bees cluster "
    "together inside the hive and shiver to keep warm.",
]
GROUNDED_PROMPTS = [
    f"Repeat the following text exactly, word for word:\n\n{_PASSAGES[0]}",
    f"Rewrite the following text with every sentence on its own line:\n\n{_PASSAGES[1]}",
    f"Quote the text below, then say in one sentence what it is about.\n\n{_PASSAGES[2]}",
    f"Summarise the following text, keeping its facts and numbers:\n\n{_PASSAGES[3]}",
]
STORY_PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They", "One day, a cat",
                 "Lily had a red ball", "A big bear", "Ben found a box", "It was a cold day"]
PROMPT_SETS = {"input-grounded": ("smollm2-135m-instruct", GROUNDED_PROMPTS, True),
               "free story": ("story", STORY_PROMPTS, False)}


@dataclass
class SetMeasurement:
    name: str
    model: str
    prompts: int
    plain_tok_s: list[float] = field(default_factory=list)     # one per run over the whole set
    speculative_tok_s: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    identical: bool = True

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.decode_steps if self.decode_steps else 0.0


def available_sets() -> list[str]:
    names = []
    for name, (model, _, _) in PROMPT_SETS.items():
        try:
            find_model(model)
            names.append(name)
        except ModelNotFoundError:
            pass
    return names


def measure_set(name: str, repeats: int, draft_max: int = DEFAULT_DRAFT_MAX, ngram: int = DEFAULT_NGRAM
                ) -> SetMeasurement:
    import minitorch_infer
    from ..generation.chat import render_chat_prompt

    model_name, prompts, chat = PROMPT_SETS[name]
    model = minitorch_infer.load(model_name, context=1024)
    prompt_ids = [render_chat_prompt(model, [{"role": "user", "content": p}]) if chat else model.encode(p)
                  for p in prompts]
    measured = SetMeasurement(name, model_name, len(prompts))
    speculate = {"speculate": "ngram", "draft_max": draft_max, "ngram": ngram}
    model.generate(prompt_ids[0], max_new_tokens=4, greedy=True)                 # warm up both programs' bindings
    model.generate(prompt_ids[0], max_new_tokens=16, greedy=True, **speculate)
    for _ in range(repeats):
        seconds = {"plain": 0.0, "speculative": 0.0}
        tokens = {"plain": 0, "speculative": 0}
        for ids in prompt_ids:
            plain = model.generate(ids, max_new_tokens=NEW_TOKENS, greedy=True)
            fast = model.generate(ids, max_new_tokens=NEW_TOKENS, greedy=True, **speculate)
            measured.identical &= fast.token_ids == plain.token_ids
            for kind, run in (("plain", plain), ("speculative", fast)):
                seconds[kind] += run.stats.decode_seconds
                tokens[kind] += max(run.stats.new_tokens - 1, 0)
            measured.drafted += fast.stats.drafted_tokens
            measured.accepted += fast.stats.accepted_tokens
            measured.new_tokens += max(fast.stats.new_tokens - 1, 0)
            measured.decode_steps += fast.stats.decode_steps
        measured.plain_tok_s.append(tokens["plain"] / seconds["plain"])
        measured.speculative_tok_s.append(tokens["speculative"] / seconds["speculative"])
    return measured


def table(measurements: list[SetMeasurement]) -> list[str]:
    import statistics

    lines = ["| prompts | model | plain decode | speculative decode | x plain | accepted | tokens/step | "
             "same tokens |", "|---|---|---|---|---|---|---|---|"]
    for m in measurements:
        plain, fast = statistics.median(m.plain_tok_s), statistics.median(m.speculative_tok_s)
        ratios = [f / p for f, p in zip(m.speculative_tok_s, m.plain_tok_s)]
        lines.append(f"| {m.name} ({m.prompts}) | {m.model} | {plain:,.1f} tok/s | {fast:,.1f} tok/s | "
                     f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] | {m.acceptance:.0%} | "
                     f"{m.tokens_per_step:.2f} | {'yes' if m.identical else 'NO'} |")
    return lines
