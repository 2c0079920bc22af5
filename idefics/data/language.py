"""Text templates of the synthetic idefics-mini data: captions, questions, document paragraphs, text-only samples.

Pure functions of (ground-truth meta, random.Random). Many templates and answer formats on purpose: a model
trained on one fixed phrasing loses the LM's in-context format copying (measured: a miniature IDEFICS trained on one answer format ignored 2-4 demonstrations of a new one).
"""

from __future__ import annotations

import random

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
ORDINALS = ("first", "second", "third", "fourth")
# Words rendered into images. None of them occurs in any other template (no shape, colour, fact or answer
# word), so a word held out for test never shows up in train text.
WORDS = sorted({
    "apple", "ball", "bear", "bird", "boat", "book", "bread", "cake", "car", "cat", "chair", "cloud", "cup", "dog",
    "door", "duck", "east", "exit", "fire", "fish", "candle", "hat", "hello", "help", "house", "key", "king", "lamp",
    "leaf", "lion", "clock", "moon", "north", "open", "phone", "plane", "queen", "rain", "river", "road", "ship",
    "shop", "horse", "south", "piano", "stone", "stop", "sun", "table", "train", "tree", "water", "west", "wind",
    "robot", "zoo", "pizza", "music", "garden", "school", "market", "coffee", "window", "summer", "winter", "bridge",
    "forest", "island", "rocket", "tiger",
})
COLOUR_FACTS = (("the sky", "blue"), ("grass", "green"), ("a banana", "yellow"), ("snow", "white"),
                ("a tomato", "red"), ("a carrot", "orange"), ("coal", "black"), ("a lemon", "yellow"),
                ("a frog", "green"), ("a strawberry", "red"), ("milk", "white"), ("a plum", "purple"),
                ("the sea", "blue"), ("chocolate", "brown"), ("an eggplant", "purple"), ("a pumpkin", "orange"))
SIDES = {"triangle": 3, "square": 4, "diamond": 4}
# Few-shot documents state the answer format only by example, in many formats, so the model learns to take
# the format from the demonstrations (in-context learning) rather than one fixed phrasing.
DOC_FORMATS = ("{x}", "Answer: {x}", "This is {x}.", "Output: {x}", "Label: {x}", "-> {x}", "It shows {x}.",
               "{x}!", "({x})", "Result: {x}", "Name: {x}", "Type: {x}", "Value: {x}", "Class: {x}", "= {x}",
               "[{x}]", "Image: {x}", "A: {x}", "{x}.", "Prediction: {x}", "Seen: {x}", "Kind: {x}", "*{x}*",
               "Picture of {x}.", "Reply: {x}", "=> {x}")
# Formats that never occur in training data, kept for measuring in-context learning of a new format
# (`idefics.mini_report`): the model sees them only in the demonstrations of its prompt.
HELD_OUT_FORMATS = ("Tag: {x}", "Category = {x}", "<{x}>")
ANSWER_FORMATS = (
    {"name": "plain", "instruction": "", "pattern": "{x}"},
    {"name": "answer_prefix", "instruction": " Answer in the form 'Answer: ...'.", "pattern": "Answer: {x}"},
    {"name": "sentence", "instruction": " Reply with 'The answer is ...'.", "pattern": "The answer is {x}."},
    {"name": "brackets", "instruction": " Put your answer in square brackets.", "pattern": "[{x}]"},
)


def with_article(word: str) -> str:
    """'a red' / 'an orange'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def where(position: str) -> str:
    """'top left' -> 'in the top left corner', 'left' -> 'on the left', 'top' -> 'at the top'."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position} corner"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def digit_caption(meta: dict, rng: random.Random) -> str:
    d = meta["digit"]
    w = NUMBER_WORDS[d]
    return rng.choice([f"a handwritten digit {w}", f"the number {d}", f"a handwritten {d}",
                       f"the digit {w}, written by hand", w, f"an image of the number {w}", str(d),
                       f"a {meta['polarity']} handwritten {d}"])


def scene_caption(meta: dict, rng: random.Random) -> str:
    objects, bg = meta["objects"], meta["background"]
    o, n = objects[0], meta["count"]
    c, s = o["colour"], o["shape"]
    if meta["mode"] == "single":
        ac, place = with_article(c), where(o["position"])
        return rng.choice([f"{ac} {s}", f"{ac} {s} {place}", f"one {c} {s} on a {bg} background",
                           f"a picture of {ac} {s}", f"a drawing of {ac} {s} {place}"])
    if meta["mode"] == "count":
        nw = NUMBER_WORDS[n]
        return rng.choice([f"{nw} {c} {s}s", f"there are {n} {c} {s}s in the picture",
                           f"{nw} {c} {s}s on a {bg} background", f"a picture with {nw} {c} {s}s"])
    with_where = rng.random() < 0.5
    parts = [f"{with_article(x['colour'])} {x['shape']}" + (f" {where(x['position'])}" if with_where else "")
             for x in objects]
    return rng.choice([join_and(parts), f"{NUMBER_WORDS[n]} shapes: {join_and(parts)}",
                       f"there is {join_and(parts)}"])


def word_caption(meta: dict, rng: random.Random) -> str:
    t, ink = meta["text"], meta["ink"]
    if t.isdigit():
        return rng.choice([f"the number {t}", t, f"the number {t} in {ink} digits", f"a sign that says {t}"])
    return rng.choice([f'the word "{t}"', f"a sign that says {t}", t, f'the text "{t}" in {ink} letters',
                       f"written text: {t}"])


def caption(meta: dict, rng: random.Random) -> str:
    return {"digit": digit_caption, "scene": scene_caption, "text": word_caption}[meta["task"]](meta, rng)


def _label(meta: dict, kind: str) -> str:
    """The short label a few-shot document gives an image; `kind` is fixed for the whole document."""
    if meta["task"] == "digit":
        return NUMBER_WORDS[meta["digit"]] if kind == "word" else str(meta["digit"])
    if meta["task"] == "text":
        return meta["text"]
    o = meta["objects"][0]
    return {"colour": o["colour"], "shape": o["shape"], "object": f"{with_article(o['colour'])} {o['shape']}",
            "position": o["position"], "count": str(meta["count"]),
            "count_words": f"{NUMBER_WORDS[meta['count']]} {plural(o['shape'], meta['count'])}"}[kind]


def document_text(style: str, metas: list[dict], rng: random.Random) -> tuple[list[str], dict]:
    """[intro, paragraph after image 1, ..., after image n] (intro may be "") and the document's meta."""
    n = len(metas)
    if style == "fewshot":
        task, mode = metas[0]["task"], metas[0].get("mode")
        kinds = {"digit": ["digit", "word"], "text": ["text"]}.get(task) or (
            ["colour", "shape", "object", "position"] if mode == "single" else ["count", "count_words"])
        kind, fmt = rng.choice(kinds), rng.choice(DOC_FORMATS)
        labels = [_label(m, kind) for m in metas]
        intro = rng.choice(["", "", "Examples:\n", "Name what you see.\n", "Label each picture.\n"])
        return [intro] + [fmt.format(x=x) + "\n" for x in labels], {"format": fmt, "label_kind": kind,
                                                                   "labels": labels}
    if style == "describe":
        captions = [caption(m, rng) for m in metas]
        fmt = rng.choice(["Picture {i} shows {c}.", "In image {i} we see {c}.", "{C}.", "The {o} picture: {c}."])
        paragraphs = [fmt.format(i=i + 1, c=c, C=capitalise(c), o=ORDINALS[i]) + "\n" for i, c in enumerate(captions)]
        return [rng.choice(["", "Here are some pictures.\n", "A few drawings:\n"])] + paragraphs, {"captions": captions}
    if style == "compare":
        (a, b), shape = [m["count"] for m in metas], metas[0]["objects"][0]["shape"]
        first = f"The first picture has {NUMBER_WORDS[a]} {plural(shape, a)}.\n"
        more = "more" if a > b else "fewer"
        second = rng.choice([f"The second picture has {NUMBER_WORDS[b]} {plural(shape, b)}, so the first picture "
                             f"has {more} {shape}s than the second.\n",
                             f"The second one has {b}. So the first picture has {more} {shape}s.\n"])
        return ["", first, second], {"counts": [a, b], "shape": shape, "answer": more}
    if style == "sequence":
        digits = [m["digit"] for m in metas]
        fmt = rng.choice(["The {o} digit is {d}.", "{d}", "Next: {w}.", "Digit {i}: {d}"])
        paragraphs = [fmt.format(o=ORDINALS[i], d=d, w=NUMBER_WORDS[d], i=i + 1) + "\n" for i, d in enumerate(digits)]
        number = "".join(map(str, digits))
        paragraphs[-1] += f"Together they read {number}.\n"
        return [rng.choice(["", "Read the digits in order.\n", "A number, one digit per picture.\n"])] + paragraphs, {
            "digits": digits, "number": number}
    raise ValueError(f"unknown document style {style!r}")


def pick_answer_format(rng: random.Random) -> dict:
    return rng.choices(ANSWER_FORMATS, [0.55, 0.15, 0.15, 0.15])[0]


def question(meta: dict, combos: list[tuple[str, str]], rng: random.Random,
             captions: bool = True) -> tuple[str, str, str]:
    """(question type, question, short answer) about one image; `combos` are the colour-shape pairs that
    may be named in a "no" answer (those allowed in the split); `captions=False` leaves out "describe"
    questions (their long answers read badly in formats like "The answer is ...")."""
    if meta["task"] == "digit":
        d = meta["digit"]
        other = d if rng.random() < 0.5 else rng.choice([x for x in range(10) if x != d])
        return rng.choice([("digit", "What digit is this?", str(d)), ("digit", "Which number is written here?", str(d)),
                           ("digit_word", "What number is shown? Answer with a word.", NUMBER_WORDS[d]),
                           ("digit", "Read the handwritten digit.", str(d)),
                           ("yes_no", f"Is this a {other}?", "yes" if other == d else "no")])
    if meta["task"] == "text":
        t = meta["text"]
        noun = "number" if t.isdigit() else "word"
        return rng.choice([("read", f"What {noun} is written in the image?", t), ("read", "What does the text say?", t),
                           ("read", "Read the text in the picture.", t),
                           ("length", f"How many {'digits' if t.isdigit() else 'letters'} does the {noun} have?",
                            str(len(t)))])
    objects = meta["objects"]
    present = {(o["colour"], o["shape"]) for o in objects}
    shapes, colours = [o["shape"] for o in objects], [o["colour"] for o in objects]
    by_type: dict[str, list[tuple[str, str]]] = {
        "count": [(rng.choice(["How many objects are there?", "How many shapes are in the picture?",
                               "Count the shapes."]), str(len(objects)))]
                 + [(f"How many {s}s are there?", str(shapes.count(s))) for s in set(shapes)],
        "colour": [(rng.choice([f"What colour is the {o['shape']}?", f"Which colour does the {o['shape']} have?"]),
                    o["colour"]) for o in objects if shapes.count(o["shape"]) == 1],
        "shape": [(rng.choice([f"What shape is the {o['colour']} object?", f"Which shape is {o['colour']}?"]),
                   o["shape"]) for o in objects if colours.count(o["colour"]) == 1],
        "position": [(f"Where is the {o['colour']} {o['shape']}?", o["position"]) for o in objects
                     if len(objects) == len(present)],
        "yes_no": [(f"Is there {with_article(c)} {s} in the picture?", "yes") for c, s in present]
                  + [(f"Is there {with_article(c)} {s} in the picture?", "no") for c, s in rng.sample(
                      [x for x in combos if x not in present], 2)],
        "caption": [(rng.choice(["Describe the picture.", "What do you see?"]), scene_caption(meta, rng))]
                   if captions else [],
    }
    kind = rng.choice(sorted(k for k, v in by_type.items() if v))
    q, a = rng.choice(by_type[kind])
    return kind, q, a


def text_question(rng: random.Random, words: list[str]) -> tuple[str, str, str]:
    """A text-only chat question with a short answer: (question, answer, kind)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    thing, colour = rng.choice(COLOUR_FACTS)
    shape, word, n = rng.choice(sorted(SIDES)), rng.choice(words), rng.randint(0, 19)
    return rng.choice([
        (f"What is {a} plus {b}?", str(a + b), "arithmetic"),
        (f"What is {max(a, b)} minus {min(a, b)}?", str(max(a, b) - min(a, b)), "arithmetic"),
        (f"What number comes after {NUMBER_WORDS[n]}?", NUMBER_WORDS[n + 1], "counting"),
        (f"How many sides does a {shape} have?", str(SIDES[shape]), "shapes"),
        (f"What colour is {thing}?", colour, "colour_fact"),
        (f"Spell the word {word}.", "-".join(word), "spelling"),
        (f"How many letters are in the word {word}?", str(len(word)), "spelling"),
    ])


def text_document(rng: random.Random, words: list[str]) -> tuple[str, str]:
    """A short text-only document (often a few lines in one repeated format, to keep format copying): (text, kind)."""
    kind = rng.choice(["counting", "arithmetic", "colour_facts", "word_games", "shapes"])
    lines = rng.randint(3, 5)
    if kind == "counting":
        start, length, step = rng.randint(0, 10), rng.randint(5, 9), rng.choice([1, 1, -1])
        seq = [start + step * i for i in range(length)] if step > 0 else [start + length - 1 - i for i in range(length)]
        as_words = rng.random() < 0.5
        return rng.choice([", ", " "]).join(NUMBER_WORDS[x] if as_words else str(x) for x in seq) + ".", kind
    if kind == "arithmetic":
        fmt = rng.choice(["{a} + {b} = {c}", "{a} plus {b} is {c}.", "Q: {a}+{b}? A: {c}"])
        pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(lines)]
        return "\n".join(fmt.format(a=a, b=b, c=a + b) for a, b in pairs), kind
    if kind == "colour_facts":
        fmt = rng.choice(["Q: What colour is {x}? A: {y}", "{X} is {y}.", "{x} -> {y}", "Colour of {x}: {y}"])
        facts = rng.sample(COLOUR_FACTS, lines)
        return "\n".join(fmt.format(x=x, X=capitalise(x), y=y) for x, y in facts), kind
    if kind == "word_games":
        transform = rng.choice([("{w}: {s}", lambda w: "-".join(w)), ("{w} -> {s}", str.upper),
                                ("{w} backwards is {s}.", lambda w: w[::-1])])
        return "\n".join(transform[0].format(w=w, s=transform[1](w)) for w in rng.sample(words, lines)), kind
    shapes = rng.sample(sorted(SIDES), len(SIDES))
    return " ".join(f"A {s} has {NUMBER_WORDS[SIDES[s]]} sides." for s in shapes), kind
