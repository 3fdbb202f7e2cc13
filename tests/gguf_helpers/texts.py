"""Seeded random strings for tokenizer round trips: words, whitespace runs, emoji, CJK, special-token text."""

import random

_PIECES = [
    "hello", "world", "The", " quick", "brown", "fox", "don't", "it's", "I'll", "naïve", "café", "Straße",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000",
    "😀", "👍🏽", "🏳️‍🌈", "👨‍👩‍👧", "🤖",
    "日本語", "中文字符", "한국어", "ひらがな", "Ελληνικά", "русский", "עברית", "العربية", "हिन्दी",
    "e\u0301", "\u200b", "\ufeff",
    "0", "42", "2024", "3.14159", "1,000,000", "²", "½", "٣",
    ".", ",", "!?", "...", "--", "()", "[]", "{}", "<>", "\"", "'", "`", "#", "@", "$", "%", "&", "*", "\\", "/",
    "def f(x):\n    return x", "<div>", "</s>", "<0x41>",
]


def random_texts(count: int, seed: int, specials: tuple[str, ...] = ()) -> list[str]:
    """`count` strings of 1 to 12 pieces, each piece from the list above, `specials`, or a random code point."""
    rng = random.Random(seed)
    pieces = _PIECES + list(specials)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.2:
                parts.append(_random_code_point(rng))
            else:
                parts.append(rng.choice(pieces))
        texts.append("".join(parts))
    return texts


def _random_code_point(rng: random.Random) -> str:
    # astral code points only up to plane 3: emoji and rare CJK live there; planes 4 and up are unassigned
    # and start with UTF-8 bytes that some byte-level vocabularies (SmolLM2's) leave out
    while True:
        code = rng.choice([rng.randint(0x20, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x3FFFF)])
        if not 0xD800 <= code <= 0xDFFF:  # surrogates are not text
            return chr(code)
