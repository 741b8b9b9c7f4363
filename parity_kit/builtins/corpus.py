"""The project's own synthetic corpus and held-out eval sets (the tokenizer trained on it: :mod:`.tokenizer`).

Everything here is generated from a seed with ``random.Random`` instances (never the global random
state), from word lists and templates written for this project. Three kinds of documents:

- chat exchanges ``User: ...\\nAssistant: ...`` with multi-line answers, including several different
  answers to "who are you" (story 01 needs near-ties at the start of a new line);
- lambada-style passages whose last word is predictable only from earlier context (story 04);
- short narrative paragraphs.

Training documents are separated by the BOS token (each starts with it; see
:func:`pack_documents`). Last-word passages are split between training and evaluation by a stable
hash of their text, so an eval item can never appear in any training corpus, whatever its size.

>>> docs = training_documents(3, seed=0)
>>> docs == training_documents(3, seed=0)
True
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import ParityKitError
from .._util.paths import data_dir

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]  # ids 0, 1, 2, 3
BOS_ID = 0
# one passage in EVAL_BUCKETS goes to evaluation, the rest may be used for training
EVAL_BUCKETS = 8
IDENTITY_PROMPT = "who are you"

# ---------------------------------------------------------------------------------------------
# word lists (written for this project)

NAMES = [
    "Mara", "Tomas", "Lena", "Oskar", "Nina", "Pablo", "Ida", "Hugo", "Vera", "Felix", "Rosa",
    "Jonas", "Clara", "Milo", "Elsa", "Anton", "Greta", "Leon", "Sofia", "Emil", "Hanna", "Bruno",
    "Alma", "Otto", "Lucy", "Viktor", "Nora", "Adam", "Iris", "Samuel", "Jana", "Peter", "Tilda",
    "Karl", "Amy", "David", "Ruth", "Oliver", "Maya", "Simon", "Julia", "Frank", "Eva", "Martin",
    "Lisa", "Walter", "Paula", "George", "Anna", "Carlos",
]
HE_NAMES = {
    "Tomas", "Oskar", "Pablo", "Hugo", "Felix", "Jonas", "Milo", "Anton", "Leon", "Emil", "Bruno",
    "Otto", "Viktor", "Adam", "Samuel", "Peter", "Karl", "David", "Oliver", "Simon", "Frank",
    "Martin", "Walter", "George", "Carlos",
}
OBJECTS = [
    "kite", "lamp", "basket", "hammer", "violin", "lantern", "blanket", "clock", "compass", "map",
    "kettle", "ladder", "bucket", "mirror", "camera", "guitar", "umbrella", "bicycle", "notebook",
    "candle", "teapot", "drum", "shovel", "scarf", "helmet", "rope", "whistle", "bottle", "key",
    "ring", "brush", "spoon", "pillow", "jacket", "radio", "anchor", "bell", "sword", "shield",
    "feather", "shell", "stone", "coin", "letter", "box", "chair", "table", "boat", "wagon", "flag",
]
ADJECTIVES = [
    "small", "old", "new", "heavy", "light", "shiny", "broken", "wooden", "tiny", "large", "soft",
    "strange", "beautiful", "simple", "bright", "dark", "golden", "silver", "plain", "tall",
]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey"]
PLACES = [
    "kitchen", "garden", "attic", "cellar", "shed", "garage", "hallway", "barn", "library",
    "bedroom", "workshop", "porch", "office", "classroom", "bakery", "station", "market", "harbor",
]
ANIMALS = [
    "cat", "dog", "horse", "rabbit", "fox", "owl", "goat", "sheep", "duck", "bear", "mouse", "crow",
    "deer", "frog", "turtle", "wolf", "hen", "pig", "cow", "squirrel",
]
FOODS = [
    "bread", "soup", "apple", "cake", "cheese", "rice", "pie", "honey", "tea", "milk", "pear",
    "carrot", "potato", "cookie", "orange", "plum", "egg", "salad",
]
JOBS = [
    "baker", "teacher", "doctor", "farmer", "painter", "sailor", "writer", "builder", "gardener",
    "singer", "driver", "tailor", "nurse", "pilot", "miller", "smith",
]
TOWNS = [
    "Brookfield", "Ashford", "Millbay", "Stonehill", "Riverton", "Oakmere", "Fairvale", "Pinecrest",
    "Westmoor", "Elmstead", "Greywater", "Longmead", "Redcliff", "Sunbury",
]
WEATHER = ["cold", "warm", "windy", "rainy", "sunny", "grey", "quiet", "foggy", "bright", "long"]
TOPICS = [
    "birds", "the sea", "old castles", "the stars", "cooking", "trains", "music", "the mountains",
    "gardens", "clocks", "ships", "the weather", "maps", "painting", "rivers", "the moon",
]
TIMES = ["morning", "afternoon", "evening", "night", "weekend", "summer", "winter", "spring"]
BUILDINGS = ["house", "tower", "mill", "chapel", "barn", "school", "inn", "cottage", "bridge"]
THINGS_TO_FIX = ["fence", "roof", "gate", "door", "window", "shelf", "wheel", "stairs", "sink"]
TOOLS = ["hammer", "saw", "drill", "wrench", "ladder", "shovel", "brush", "rope", "pliers"]

# ---------------------------------------------------------------------------------------------
# small helpers


def _pronoun(name: str) -> tuple[str, str]:
    """(subject, possessive) pronoun of a name."""
    return ("he", "his") if name in HE_NAMES else ("she", "her")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


def _filler(rng: random.Random, others: list[str], avoid: set[str]) -> str:
    """One distractor sentence: other people, objects and places that are not the answer."""
    objs = [o for o in OBJECTS if o not in avoid]
    b = rng.choice(others)
    he, his = _pronoun(b)
    choices = [
        f"The weather was {rng.choice(WEATHER)} that {rng.choice(TIMES)}.",
        f"{b} was reading a book about {rng.choice(TOPICS)}.",
        f"{_cap(_article(a := rng.choice(ANIMALS)))} {a} sat quietly by the window.",
        f"{b} talked about {his} {rng.choice(objs)} for a while.",
        f"Somewhere outside, a {rng.choice(ANIMALS)} was making a lot of noise.",
        f"{b} brought some {rng.choice(FOODS)} and everyone had a little.",
        "For a long time nobody said anything.",
        f"{b} said that {he} had once lost {_article(o := rng.choice(objs))} {o} in the {rng.choice(PLACES)}.",
        f"The {rng.choice(objs)} on the shelf was covered in dust.",
        f"Later {b} went to the {rng.choice(PLACES)} to look for a {rng.choice(objs)}.",
        f"It was almost {rng.choice(TIMES)} when the rain stopped.",
        f"{b} laughed and told a story about {rng.choice(TOPICS)}.",
    ]
    return rng.choice(choices)


def _fillers(rng: random.Random, others: list[str], avoid: set[str], lo: int = 1, hi: int = 4) -> str:
    return " ".join(_filler(rng, others, avoid) for _ in range(rng.randint(lo, hi)))


# ---------------------------------------------------------------------------------------------
# lambada-style passages: (context, target) with the target a single word with its leading space


def _lw_object_in_place(rng: random.Random) -> tuple[str, str]:
    a, b, c = _names(rng, 3)
    he, his = _pronoun(a)
    obj = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    ctx = (
        f"{a} kept {_article(adj := rng.choice(ADJECTIVES))} {adj} {obj} in the {place}. "
        f"Nobody else in the family was allowed to touch it. {_fillers(rng, [b, c], {obj})} "
        f"One {rng.choice(TIMES)}, {b} asked what was hidden in the {place}, and {a} said it was {his}"
    )
    return ctx, f" {obj}"


def _lw_fix_with_tool(rng: random.Random) -> tuple[str, str]:
    a, b = _names(rng, 2)
    he, his = _pronoun(a)
    thing, tool = rng.choice(THINGS_TO_FIX), rng.choice(TOOLS)
    ctx = (
        f"The {thing} had been broken since the storm, so {a} went to get {his} {tool}. "
        f"{_fillers(rng, [b], {tool})} "
        f"After an hour the {thing} was fixed at last, and {a} carefully put away the"
    )
    return ctx, f" {tool}"


def _lw_name_of_job(rng: random.Random) -> tuple[str, str]:
    a, b, c = _names(rng, 3)
    job, town = rng.choice(JOBS), rng.choice(TOWNS)
    he, his = _pronoun(a)
    ctx = (
        f"Many years ago a {job} named {a} came to the town of {town}. "
        f"{_cap(he)} lived in a small house near the {rng.choice(BUILDINGS)}. "
        f"{_fillers(rng, [b, c], set())} "
        f"Even today, people in {town} still talk about the {job} called"
    )
    return ctx, f" {a}"


def _lw_roof_object(rng: random.Random) -> tuple[str, str]:
    a, b = _names(rng, 2)
    building, obj = rng.choice(BUILDINGS), rng.choice(OBJECTS)
    ctx = (
        f"The old {building} at the end of {a}'s street had {_article(obj)} {obj} on its roof. "
        f"Nobody knew who had put it there. {_fillers(rng, [a, b], {obj})} "
        f"Years later, when the {building} was sold, the new owners finally took down the"
    )
    return ctx, f" {obj}"


def _lw_door_color(rng: random.Random) -> tuple[str, str]:
    a, b, c = _names(rng, 3)
    col, col2 = rng.sample(COLORS, 2)
    ctx = (
        f"In the {rng.choice(TIMES)} {a} painted the front door {col}, and {b} painted the fence {col2}. "
        f"{_fillers(rng, [a, b, c], set())} "
        f"When {c} came to visit, {c} stopped at the gate and saw that the door was now"
    )
    return ctx, f" {col}"


def _lw_pet_name(rng: random.Random) -> tuple[str, str]:
    a, b = _names(rng, 2)
    animal = rng.choice(ANIMALS)
    he, his = _pronoun(a)
    food = rng.choice(FOODS)
    ctx = (
        f"{a} had {_article(animal)} {animal} that liked to eat {food}. "
        f"Every {rng.choice(TIMES)} {he} gave it a little {food} from the kitchen. "
        f"{_fillers(rng, [b], set())} "
        f"When the {animal} came to the door again, {a} went to find some more"
    )
    return ctx, f" {food}"


def _lw_who_helped(rng: random.Random) -> tuple[str, str]:
    a, b, c = _names(rng, 3)
    obj = rng.choice(OBJECTS)
    he, his = _pronoun(b)
    ctx = (
        f"{a} could not carry the heavy {obj} alone, so {b} came to help. "
        f"Together they brought it all the way to the {rng.choice(PLACES)}. "
        f"{_fillers(rng, [a, c], {obj})} "
        f"Later {a} wrote a short letter to say thank you to"
    )
    return ctx, f" {b}"


_LASTWORD_TEMPLATES = [
    _lw_object_in_place, _lw_fix_with_tool, _lw_name_of_job, _lw_roof_object, _lw_door_color,
    _lw_pet_name, _lw_who_helped,
]


def lastword_passage(rng: random.Random) -> tuple[str, str]:
    """One lambada-style passage ``(context, target)``; ``target`` is one word with its leading space.

    >>> ctx, target = lastword_passage(random.Random(1))
    >>> target.startswith(" ") and " " not in target[1:]
    True
    """
    return rng.choice(_LASTWORD_TEMPLATES)(rng)


def is_eval_passage(context: str, target: str) -> bool:
    """True if this passage belongs to the held-out bucket (stable hash, independent of any seed).

    >>> is_eval_passage("a", " b") in (True, False)
    True
    """
    digest = hashlib.sha256((context + target).encode()).digest()
    return digest[0] % EVAL_BUCKETS == 0


# ---------------------------------------------------------------------------------------------
# chat exchanges


_IDENTITY_QUESTIONS = [
    "who are you", "Who are you?", "who are you?", "Who are you", "What are you?",
    "Tell me about yourself.", "What is your name?",
]


def _identity_answer(rng: random.Random) -> str:
    first = rng.choice([
        "I am Tiny, a small language model.",
        "I am Tiny, a small language model made for testing.",
        "My name is Tiny. I am a very small language model.",
        "I am Tiny, a little assistant that was trained on a tiny corpus.",
        "Hello! I am Tiny, a small model that writes text.",
    ])
    middle = rng.sample([
        "I was trained on short stories and simple conversations.",
        "I can answer simple questions and write short stories.",
        "I am not very smart, but I try to be helpful.",
        "I do not know much about the world.",
        "I have only a few layers and a small vocabulary.",
        "I was made to help people test numbers in models.",
        "I can make lists, tell stories and count a little.",
        "Sometimes I make mistakes, so please check my answers.",
    ], rng.randint(1, 3))
    last = rng.choice([
        "How can I help you today?",
        "What would you like to talk about?",
        "Ask me anything!",
        "",
    ])
    lines = [first, *middle] + ([last] if last else [])
    if rng.random() < 0.4:
        lines.insert(1, "")  # an empty line, as chat models often write
    return "\n".join(lines)


def _list_answer(rng: random.Random) -> tuple[str, str]:
    kind, pool = rng.choice([
        ("animals", ANIMALS), ("foods", FOODS), ("colors", COLORS), ("jobs", JOBS),
        ("places in a house", PLACES[:12]), ("tools", TOOLS), ("towns", TOWNS),
    ])
    k = rng.randint(3, 5)
    number = ["three", "four", "five"][k - 3]
    question = rng.choice([f"Name {number} {kind}.", f"Can you list {number} {kind}?", f"Give me {number} {kind}."])
    items = rng.sample(pool, k)
    bullet = rng.choice(["- ", "* ", None])
    lines = [rng.choice([f"Here are {number} {kind}:", f"Sure, here are {number} {kind}:", "Of course:"])]
    for i, item in enumerate(items):
        lines.append(f"{bullet}{_cap(item)}" if bullet else f"{i + 1}. {_cap(item)}")
    if rng.random() < 0.5:
        lines.append(rng.choice(["I hope this helps.", "Do you want more?", "There are many more."]))
    return question, "\n".join(lines)


def _how_to_answer(rng: random.Random) -> tuple[str, str]:
    task, steps = rng.choice([
        ("make tea", ["Boil some water.", "Put a tea bag in a cup.", "Pour the hot water into the cup.",
                      "Wait for three minutes.", "Take out the tea bag and add some milk or honey."]),
        ("plant a tree", ["Choose a sunny place in the garden.", "Dig a hole that is wide and deep.",
                          "Put the young tree in the hole.", "Fill the hole with soil.", "Give the tree plenty of water."]),
        ("fix a flat tire", ["Take the wheel off the bicycle.", "Find the hole in the tube.",
                             "Put a small patch on the hole.", "Pump up the tire again.", "Put the wheel back on."]),
        ("bake bread", ["Mix flour, water, salt and yeast.", "Knead the dough for ten minutes.",
                        "Let the dough rest for an hour.", "Shape the loaf.", "Bake it in a hot oven."]),
        ("learn a song", ["Listen to the song a few times.", "Read the words slowly.", "Sing one line at a time.",
                          "Practice the hard parts again.", "Sing the whole song from the start."]),
        ("clean a room", ["Open the window.", "Put everything back in its place.", "Dust the shelves.",
                          "Sweep the floor.", "Take out the trash."]),
        ("write a letter", ["Write the date at the top.", "Greet the person by name.", "Say why you are writing.",
                            "Add a few friendly lines.", "Sign your name at the end."]),
    ])
    question = rng.choice([f"How do I {task}?", f"How can I {task}?", f"Tell me how to {task}.",
                           f"What are the steps to {task}?"])
    k = rng.randint(3, len(steps))
    chosen = steps[:k]
    lines = [rng.choice([f"To {task}, follow these steps:", "Here is a simple way:", "Sure! Here are the steps:"])]
    lines += [f"{i + 1}. {s}" for i, s in enumerate(chosen)]
    if rng.random() < 0.5:
        lines.append(rng.choice(["That is all.", "Good luck!", "It is easier than it looks."]))
    return question, "\n".join(lines)


def _describe_answer(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(ANIMALS)
    food = rng.choice(FOODS)
    question = rng.choice([f"Tell me about the {animal}.", f"What do you know about the {animal}?",
                           f"Describe a {animal}."])
    facts = rng.sample([
        f"The {animal} is an animal that many people know.",
        f"A {animal} can be found near farms and forests.",
        f"Some people say the {animal} likes to eat {food}.",
        f"The {animal} is most active in the {rng.choice(TIMES)}.",
        f"Children often read stories about a {rng.choice(ADJECTIVES)} {animal}.",
        f"A young {animal} stays close to its mother.",
        f"In the {rng.choice(TIMES)} the {animal} looks for a warm place to sleep.",
    ], rng.randint(2, 4))
    return question, "\n".join(facts)


def _story_answer(rng: random.Random) -> tuple[str, str]:
    a = rng.choice(NAMES)
    he, his = _pronoun(a)
    obj = rng.choice(OBJECTS)
    question = rng.choice([f"Write a short story about {a} and {_article(obj)} {obj}.",
                           f"Tell me a story about {_article(obj)} {obj}."])
    lines = [
        f"Once upon a time, {a} found {_article(adj := rng.choice(ADJECTIVES))} {adj} {obj} in the {rng.choice(PLACES)}.",
        f"{_cap(he)} took the {obj} home and showed it to {his} friend {rng.choice(NAMES)}.",
        rng.choice([f"Together they used the {obj} every day.", f"The {obj} turned out to be magic.",
                    f"But the next {rng.choice(TIMES)} the {obj} was gone."]),
        rng.choice(["The end.", f"{a} never forgot that day.", "And they were happy."]),
    ]
    return question, "\n".join(lines)


def _math_answer(rng: random.Random) -> tuple[str, str]:
    x, y = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
    big, small = max(x, y), min(x, y)
    return f"What is {big} minus {small}?", f"{big} minus {small} is {big - small}."


_QA = [_list_answer, _how_to_answer, _describe_answer, _story_answer, _math_answer]


def _chat_turn(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.3:
        return rng.choice(_IDENTITY_QUESTIONS), _identity_answer(rng)
    return rng.choice(_QA)(rng)


def chat_exchange(rng: random.Random) -> str:
    """A chat document: one to three ``User: ...\\nAssistant: ...`` turns with multi-line answers.

    >>> chat_exchange(random.Random(0)).startswith("User: ")
    True
    """
    turns = [_chat_turn(rng) for _ in range(rng.randint(1, 3))]
    return "\n".join(f"User: {q}\nAssistant: {a}" for q, a in turns) + "\n"


def chat_prompt(question: str) -> str:
    """The prompt that asks the model to answer ``question``, formatted as in training.

    >>> chat_prompt("who are you")
    'User: who are you\\nAssistant:'
    """
    return f"User: {question}\nAssistant:"


# ---------------------------------------------------------------------------------------------
# narrative paragraphs


def narrative(rng: random.Random) -> str:
    """A short narrative paragraph (general English-like text).

    >>> narrative(random.Random(0)).endswith(".")
    True
    """
    a, b = _names(rng, 2)
    he, his = _pronoun(a)
    town = rng.choice(TOWNS)
    sentences = [
        f"{a} lived in {town} and worked as {_article(job := rng.choice(JOBS))} {job}.",
        f"Every {rng.choice(TIMES)} {he} walked past the {rng.choice(BUILDINGS)} on the way to the {rng.choice(PLACES)}.",
    ]
    for _ in range(rng.randint(2, 5)):
        sentences.append(_filler(rng, [a, b], set()))
    sentences.append(rng.choice([
        f"In the end {a} and {b} became good friends.",
        f"That was the last time {a} saw the {rng.choice(OBJECTS)}.",
        f"{a} still remembers that {rng.choice(WEATHER)} {rng.choice(TIMES)}.",
    ]))
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------------
# corpora and eval sets


def _training_document(rng: random.Random) -> str:
    u = rng.random()
    if u < 0.45:
        return chat_exchange(rng)
    if u < 0.85:
        while True:  # reject passages of the held-out bucket
            ctx, target = lastword_passage(rng)
            if not is_eval_passage(ctx, target):
                return ctx + target
    return narrative(rng)


def iter_training_documents(seed: int = 0) -> Iterator[str]:
    """Endless stream of training documents (text only; BOS is added at packing time).

    >>> it = iter_training_documents(0)
    >>> isinstance(next(it), str)
    True
    """
    rng = random.Random(f"parity_kit/train/{seed}")
    while True:
        yield _training_document(rng)


def training_documents(n: int, seed: int = 0) -> list[str]:
    """The first ``n`` training documents of the stream for ``seed``.

    >>> len(training_documents(5))
    5
    """
    if n < 0:
        raise ParityKitError(f"n must be >= 0, got {n}")
    it = iter_training_documents(seed)
    return [next(it) for _ in range(n)]


def lastword_eval_items(n: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct held-out last-word items ``{"context", "target"}``, disjoint from any training corpus.

    The stream uses its own seed string and keeps only passages of the eval hash bucket, which
    training never uses.

    >>> items = lastword_eval_items(3)
    >>> sorted(items[0])
    ['context', 'target']
    """
    rng = random.Random(f"parity_kit/eval/{seed}")
    items: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(items) < n:
        ctx, target = lastword_passage(rng)
        if is_eval_passage(ctx, target) and ctx not in seen:
            seen.add(ctx)
            items.append({"context": ctx, "target": target})
    return items


def chat_prompts(n: int = 40, seed: int = 0) -> list[str]:
    """``n`` distinct chat prompts ending with the ``Assistant:`` cue; the first asks "who are you".

    >>> chat_prompts(3)[0]
    'User: who are you\\nAssistant:'
    """
    rng = random.Random(f"parity_kit/prompts/{seed}")
    prompts = [chat_prompt(IDENTITY_PROMPT)]
    while len(prompts) < n:
        question, _ = _chat_turn(rng)
        p = chat_prompt(question)
        if p not in prompts:
            prompts.append(p)
    return prompts


def read_lastword_items(path: str | Path | None = None) -> list[dict[str, str]]:
    """Read a last-word JSONL file (default: ``parity_kit/data/eval/lastword.jsonl``).

    >>> len(read_lastword_items()) >= 500
    True
    """
    file = Path(path) if path is not None else data_dir() / "eval" / "lastword.jsonl"
    if not file.is_file():
        raise ParityKitError(f"no last-word eval file at {file}; build it with parity_kit.builtins.data.build_data()")
    items = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, item in enumerate(items):
        if set(item) != {"context", "target"}:
            raise ParityKitError(f"{file} line {i + 1}: expected keys 'context' and 'target', got {sorted(item)}")
    return items
