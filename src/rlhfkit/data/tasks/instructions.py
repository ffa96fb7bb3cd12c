"""The built-in instruction-tuning dataset (``builtin:instructions``), generated deterministically.

Rows are ``sft`` records ``{"messages": [...], "task": "<type>"}`` over fourteen single-turn task
types (worked arithmetic, reversing a word, upper/lower-casing a sentence, sorting numbers,
counting words and letters, antonyms, country capitals, unit conversion, short definitions,
turning a list into a sentence, a fixed-format thank-you note, even/odd), plus ``multi_turn``
rows (a follow-up question about the previous answer) and ``with_system`` rows (a leading system
message, one of which changes the reply's opening).

House style, so that a small model visibly picks it up after a few fine-tuning steps: every
reply is one short line of working followed by a final line ``Answer: <answer>``.

Splits: each task draws its items (a word, a fact, a random problem) from one pool without
replacement, held-out rows first, so the ``heldout`` and ``train`` splits never share an item or a
prompt. Everything derives from ``SEED`` through ``random.Random``; ``main()`` rewrites the
shipped ``instructions_train.jsonl`` and ``instructions_heldout.jsonl`` (a test checks they equal
a fresh build).

This file is longer than the ~400-line guideline because it holds the hand-written word lists
and facts the rows are built from; the code follows them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20240611

# --- Hand-written material (written for this project) -----------------------------------

# fmt: off
WORDS = (
    "apple", "garden", "planet", "window", "river", "candle", "forest", "rocket", "pencil",
    "silver", "orange", "butter", "castle", "dragon", "guitar", "island", "jacket", "kitten",
    "ladder", "marble", "needle", "pepper", "rabbit", "saddle", "tunnel", "velvet", "wizard",
    "yellow", "zipper", "basket", "camera", "desert", "engine", "flower", "ginger", "hammer",
    "jungle", "kettle", "lemon", "mirror", "nature", "ocean", "parrot", "quiet", "rainbow",
    "sunset", "tomato", "unicorn", "violin", "walrus", "anchor", "bridge", "cactus", "dolphin",
    "eagle", "falcon", "glacier", "harbor", "igloo", "jelly", "koala", "lantern", "meadow",
    "noodle", "oyster", "pirate", "quilt", "ribbon", "spider", "throne", "umbrella", "volcano",
    "whistle", "cookie", "puzzle", "blanket", "chimney", "feather", "pumpkin", "teapot", "compass",
    "magnet",
)

SENTENCES = (
    "The cat sat on the mat.", "We walked to the park after lunch.",
    "My brother plays the piano every evening.", "Rain is expected later this afternoon.",
    "She painted the old fence bright blue.", "The train leaves at seven in the morning.",
    "Birds sing loudly in the spring.", "Please close the door when you leave.",
    "Our team won the final match.", "The library opens at nine.",
    "He bought fresh bread from the bakery.", "The moon looks very bright tonight.",
    "I like to read before bed.", "They planted tomatoes in the garden.",
    "The river flows through the old town.", "My grandmother tells wonderful stories.",
    "The children built a snowman in the yard.", "A small boat sailed across the lake.",
    "The museum has a famous painting.", "We need more chairs for the party.",
    "The dog chased the ball across the field.", "Fresh snow covered the mountain road.",
    "The baker starts work before sunrise.", "Please send me the report by Friday.",
    "The orange cat sleeps on the sofa.", "Tom and Anna visited Paris last summer.",
    "The coffee in this cafe is excellent.", "Every student brought a notebook.",
    "The wind blew the leaves across the street.", "Our neighbor grows roses and tulips.",
    "The concert starts in ten minutes.", "A rainbow appeared after the storm.",
    "The old clock still works perfectly.", "My sister swims in the lake every morning.",
    "The kitchen smells of warm cinnamon.", "We watched the stars from the roof.",
    "The bus was late again today.", "He fixed the bike with a small wrench.",
    "The farmer feeds the chickens at dawn.", "Lisa wrote a letter to her friend.",
    "The shop sells handmade candles.", "The waves crashed against the rocks.",
    "Our teacher explained the lesson clearly.", "The bread is still warm from the oven.",
    "A gentle breeze cooled the hot afternoon.", "The puppy fell asleep in my arms.",
    "We packed sandwiches for the long trip.", "The lights of the city sparkled at night.",
    "My phone battery is almost empty.", "The garden looks lovely in June.",
)

CAPITALS = (  # (country as written mid-sentence, capital city)
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"), ("Hungary", "Budapest"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
    ("Iceland", "Reykjavik"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Turkey", "Ankara"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Malaysia", "Kuala Lumpur"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Uganda", "Kampala"),
    ("Senegal", "Dakar"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Jamaica", "Kingston"),
    ("Mongolia", "Ulaanbaatar"), ("Qatar", "Doha"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
)

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("full", "empty"),
    ("early", "late"), ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("thick", "thin"),
    ("long", "short"), ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("true", "false"),
    ("clean", "dirty"), ("heavy", "light"), ("above", "below"), ("inside", "outside"),
    ("asleep", "awake"), ("before", "after"), ("remember", "forget"), ("increase", "decrease"),
    ("maximum", "minimum"), ("enter", "exit"), ("question", "answer"), ("success", "failure"),
    ("friend", "enemy"), ("brave", "cowardly"), ("smooth", "rough"), ("shallow", "deep"),
    ("narrow", "wide"), ("cheap", "expensive"), ("safe", "dangerous"), ("north", "south"),
    ("east", "west"), ("top", "bottom"), ("first", "last"), ("always", "never"),
    ("everything", "nothing"), ("laugh", "cry"), ("polite", "rude"), ("tidy", "messy"),
    ("float", "sink"), ("borrow", "lend"), ("dawn", "dusk"), ("ancient", "modern"),
)

DEFINITIONS = (  # (word, definition, example sentence)
    ("library", "A library is a place where people can read or borrow books.",
     "We borrowed three books from the library."),
    ("island", "An island is a piece of land with water all around it.",
     "They took a ferry to the island."),
    ("volcano", "A volcano is a mountain that can erupt with hot lava, ash and gas.",
     "The volcano erupted for the first time in years."),
    ("bridge", "A bridge is a structure that carries a road or path over a river or valley.",
     "We walked across the bridge."),
    ("calendar", "A calendar is a chart that shows the days, weeks and months of a year.",
     "I marked her birthday on the calendar."),
    ("thermometer", "A thermometer is a tool that measures temperature.",
     "The thermometer showed twenty degrees."),
    ("umbrella", "An umbrella is a folding cover that keeps you dry in the rain.",
     "Take an umbrella in case it rains."),
    ("dictionary", "A dictionary is a book or app that lists words with their meanings.",
     "She looked up the word in a dictionary."),
    ("orchestra", "An orchestra is a large group of musicians who play instruments together.",
     "The orchestra played a symphony."),
    ("desert", "A desert is a very dry area of land that gets little rain.",
     "Camels can walk a long way across the desert."),
    ("glacier", "A glacier is a huge, slow-moving mass of ice.",
     "The glacier moves a few meters each year."),
    ("harbor", "A harbor is a sheltered area of water where ships can stay safely.",
     "The fishing boats returned to the harbor."),
    ("triangle", "A triangle is a flat shape with three straight sides.",
     "She drew a triangle on the board."),
    ("noun", "A noun is a word that names a person, place or thing.",
     "In 'the dog barked', 'dog' is a noun."),
    ("verb", "A verb is a word that describes an action or a state.",
     "In 'she runs fast', 'runs' is a verb."),
    ("adjective", "An adjective is a word that describes a noun.",
     "In 'a red car', 'red' is an adjective."),
    ("recipe", "A recipe is a set of instructions for cooking a dish.",
     "I followed my grandmother's recipe for soup."),
    ("passport", "A passport is an official document that lets you travel between countries.",
     "Remember to bring your passport to the airport."),
    ("compass", "A compass is a tool with a magnetic needle that points north.",
     "The hikers used a compass to find their way."),
    ("microscope", "A microscope is an instrument that makes tiny things look much larger.",
     "We looked at a leaf under the microscope."),
    ("telescope", "A telescope is an instrument that makes distant objects look closer.",
     "He saw the rings of Saturn through a telescope."),
    ("map", "A map is a drawing of an area that shows where places are.",
     "We checked the map before the hike."),
    ("bakery", "A bakery is a shop where bread and cakes are made and sold.",
     "The bakery opens early every morning."),
    ("museum", "A museum is a building where interesting objects are kept and shown to the public.",
     "The museum has dinosaur bones."),
    ("astronaut", "An astronaut is a person trained to travel into space.",
     "The astronaut spent six months in space."),
    ("vegetarian", "A vegetarian is a person who does not eat meat.",
     "My friend is a vegetarian, so we made a bean stew."),
    ("peninsula", "A peninsula is a piece of land almost surrounded by water.",
     "The town sits at the tip of a peninsula."),
    ("canyon", "A canyon is a deep valley with steep sides, often cut by a river.",
     "The river carved a deep canyon."),
    ("lighthouse", "A lighthouse is a tower with a bright light that guides ships.",
     "The lighthouse flashed every few seconds."),
    ("fossil", "A fossil is the preserved remains or trace of an ancient plant or animal.",
     "She found a fossil of a shell in the rock."),
    ("magnet", "A magnet is an object that pulls iron and steel toward it.",
     "The magnet held the note on the fridge."),
    ("alphabet", "An alphabet is the set of letters used to write a language.",
     "The English alphabet has 26 letters."),
    ("synonym", "A synonym is a word that means the same as another word.",
     "'Big' is a synonym of 'large'."),
    ("century", "A century is a period of one hundred years.",
     "The castle is more than a century old."),
    ("decade", "A decade is a period of ten years.", "They have lived here for a decade."),
    ("fortnight", "A fortnight is a period of two weeks.",
     "We will be on holiday for a fortnight."),
    ("dozen", "A dozen is a group of twelve.", "She bought a dozen eggs."),
    ("hexagon", "A hexagon is a flat shape with six straight sides.",
     "Each cell of a honeycomb is a hexagon."),
    ("marathon", "A marathon is a running race of about 42 kilometers.",
     "She trained for months to run a marathon."),
    ("habitat", "A habitat is the natural home of an animal or plant.",
     "The forest is the habitat of many birds."),
    ("orbit", "An orbit is the curved path of an object around a planet or star.",
     "The Moon is in orbit around the Earth."),
)

UNITS = (  # (from, from singular, to, factor): exactly `factor` of `to` in one `from`
    ("kilometers", "kilometer", "meters", 1000), ("meters", "meter", "centimeters", 100),
    ("centimeters", "centimeter", "millimeters", 10), ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000), ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60), ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7), ("years", "year", "months", 12), ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
)

NAMES = (
    "Maya", "Omar", "Lucas", "Priya", "Chen", "Sofia", "Daniel", "Aisha", "Leo", "Hannah", "Mateo",
    "Yuki", "Grace", "Samuel", "Amara", "Noah", "Elena", "Ravi", "Zoe", "Felix", "Nadia", "Oscar",
    "Ines", "Kofi", "Mia", "Jonas", "Lena", "Tariq", "Clara", "Ben",
)

GIFTS = (
    "flowers", "birthday card", "book", "lovely dinner", "help with the move", "kind words",
    "chocolates", "ride to the airport", "warm scarf", "good advice", "plant", "concert tickets",
    "homemade cookies", "postcard", "coffee",
)

LISTS = (  # (kind, sentence opening, items)
    ("shopping", "We need", (
        "eggs", "flour", "milk", "butter", "apples", "rice", "cheese", "carrots", "onions", "bread",
        "tea", "sugar", "oranges", "beans", "pasta", "yogurt", "honey", "spinach",
    )),
    ("packing", "Remember to pack", (
        "a hat", "sunscreen", "a towel", "a map", "a warm jacket", "spare socks", "a phone charger",
        "a good book", "some snacks", "a water bottle", "sunglasses", "a toothbrush",
    )),
)

SYSTEM_PROMPTS = (  # (system message, opening added to the reply)
    ("You are a helpful assistant. Keep your answers short and clear.", ""),
    ("You are a cheerful assistant. Start every reply with 'Happy to help!'", "Happy to help! "),
)
# fmt: on

# --- Renderers: (item, rng) -> (user message, assistant reply) -------------------------------

Turn = tuple[str, str]


def _reply(work: str, answer: object) -> str:
    return f"{work}\nAnswer: {answer}"


def _draw_arithmetic(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("+-*")
    if op == "*":
        return rng.randint(11, 99), op, rng.randint(2, 9)
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def _arithmetic_value(item: tuple[int, str, int]) -> int:
    a, op, b = item
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _arithmetic(item: tuple[int, str, int], rng: random.Random) -> Turn:
    a, op, b = item
    expr, result = f"{a} {op} {b}", _arithmetic_value(item)
    tens, ones = a - a % 10, a % 10
    if op == "*":
        work = f"{tens} * {b} = {tens * b} and {ones} * {b} = {ones * b}, "
        work += f"so {tens * b} + {ones * b} = {result}."
    elif op == "+":
        bt, bo = b - b % 10, b % 10
        work = f"{tens} + {bt} = {tens + bt} and {ones} + {bo} = {ones + bo}, "
        work += f"so {tens + bt} + {ones + bo} = {result}."
    else:
        bt, bo = b - b % 10, b % 10
        work = f"{a} - {bt} = {a - bt}, then {a - bt} - {bo} = {result}."
    template = rng.choice(
        ("What is {e}?", "Calculate {e}.", "What does {e} equal?", "Work out {e}.")
    )
    return template.format(e=expr), _reply(f"{expr}: {work}", result)


def _reverse(word: str, rng: random.Random) -> Turn:
    template = rng.choice(
        (
            "Reverse the word '{w}'.",
            "Spell '{w}' backwards.",
            "Write the word '{w}' in reverse order.",
        )
    )
    work = (
        f"The letters of '{word}' are {'-'.join(word)}. In reverse order: {'-'.join(word[::-1])}."
    )
    return template.format(w=word), _reply(work, word[::-1])


def _uppercase(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('Rewrite this sentence in capital letters: "{s}"', 'Convert to uppercase: "{s}"')
    )
    return template.format(s=sentence), _reply(
        "Every letter becomes a capital letter.", sentence.upper()
    )


def _lowercase(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('Rewrite this sentence in lowercase letters: "{s}"', 'Convert to lowercase: "{s}"')
    )
    work = "Every capital letter becomes a lowercase letter."
    return template.format(s=sentence.upper()), _reply(work, sentence.lower())


def _draw_sort(rng: random.Random) -> tuple[tuple[int, ...], bool]:
    return tuple(rng.sample(range(1, 100), rng.randint(4, 6))), rng.random() < 0.5


def _sort(item: tuple[tuple[int, ...], bool], rng: random.Random) -> Turn:
    numbers, ascending = item
    listed = ", ".join(map(str, numbers))
    if ascending:
        template = rng.choice(
            (
                "Sort these numbers from smallest to largest: {n}.",
                "Put these numbers in order, smallest first: {n}.",
            )
        )
        work = f"The smallest is {min(numbers)} and the largest is {max(numbers)}."
    else:
        template = rng.choice(
            (
                "Sort these numbers from largest to smallest: {n}.",
                "Put these numbers in order, largest first: {n}.",
            )
        )
        work = f"The largest is {max(numbers)} and the smallest is {min(numbers)}."
    ordered = sorted(numbers, reverse=not ascending)
    return template.format(n=listed), _reply(work, ", ".join(map(str, ordered)))


def _count_words(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('How many words are in this sentence? "{s}"', 'Count the words in: "{s}"')
    )
    words = sentence.rstrip(".").split()
    numbered = " ".join(f"{word} ({i})" for i, word in enumerate(words, 1))
    return template.format(s=sentence), _reply(f"Numbering the words: {numbered}.", len(words))


def _count_letters(word: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ("How many letters are in the word '{w}'?", "Count the letters in '{w}'.")
    )
    work = f"Spelled out: {'-'.join(word)}. That is {len(word)} letters."
    return template.format(w=word), _reply(work, len(word))


def _antonym(item: tuple[str, str], rng: random.Random) -> Turn:
    word, opposite = item
    template = rng.choice(
        (
            "What is the opposite of '{w}'?",
            "Give the antonym of '{w}'.",
            "What word means the opposite of '{w}'?",
        )
    )
    return template.format(w=word), _reply(f"The opposite of '{word}' is '{opposite}'.", opposite)


def _capital(item: tuple[str, str], rng: random.Random) -> Turn:
    country, city = item
    template = rng.choice(
        (
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital city of {c}.",
        )
    )
    return template.format(c=country), _reply(f"The capital of {country} is {city}.", city)


def _draw_unit(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 15), rng.randrange(len(UNITS))


def _unit(item: tuple[int, int], rng: random.Random) -> Turn:
    value, index = item
    source, singular, target, factor = UNITS[index]
    template = rng.choice(("Convert {v} {s} to {t}.", "How many {t} are in {v} {s}?"))
    work = f"One {singular} is {factor} {target}, so {value} * {factor} = {value * factor}."
    return template.format(v=value, s=source, t=target), _reply(work, f"{value * factor} {target}")


def _definition(item: tuple[str, str, str], rng: random.Random) -> Turn:
    word, definition, example = item
    template = rng.choice(("What does '{w}' mean?", "Define the word '{w}'."))
    return template.format(w=word), _reply(f"For example: {example}", definition)


def _draw_list(rng: random.Random) -> tuple[int, tuple[str, ...]]:
    kind = rng.randrange(len(LISTS))
    return kind, tuple(sorted(rng.sample(LISTS[kind][2], rng.randint(3, 4))))


def _list_sentence(item: tuple[int, tuple[str, ...]], rng: random.Random) -> Turn:
    kind, opening, _ = LISTS[item[0]]
    items = rng.sample(item[1], len(item[1]))  # a shuffled copy: the order shown varies
    bullets = "\n".join(f"- {thing}" for thing in items)
    user = f"Turn this {kind} list into one sentence that starts with '{opening}':\n{bullets}"
    sentence = f"{opening} {', '.join(items[:-1])} and {items[-1]}."
    return user, _reply(
        "I joined the items with commas and put 'and' before the last one.", sentence
    )


def _draw_thanks(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(GIFTS)


def _thanks(item: tuple[str, str], rng: random.Random) -> Turn:
    name, gift = item
    template = rng.choice(
        ("Write a short thank-you note to {n} for the {g}.", "Help me thank {n} for the {g}.")
    )
    note = f"Thank you so much for the {gift}, {name}! It really made my day."
    return template.format(n=name, g=gift), _reply("Here is a short, friendly note.", note)


def _even_odd(n: int, rng: random.Random) -> Turn:
    template = rng.choice(("Is {n} even or odd?", "Is the number {n} odd or even?"))
    digit, parity = n % 10, "even" if n % 2 == 0 else "odd"
    return template.format(n=n), _reply(
        f"{n} ends in {digit}, and {digit} is {parity}, so {n} is {parity}.", parity
    )


# --- Follow-up turns for multi-turn rows: (first item, rng) -> second turn -------------------


def _times_followup(item: tuple[int, str, int], rng: random.Random) -> Turn:
    value, k = _arithmetic_value(item), rng.randint(2, 5)
    return f"Now multiply that by {k}.", _reply(f"{value} * {k} = {value * k}.", value * k)


def _caps_followup(word: str, rng: random.Random) -> Turn:
    reversed_word = word[::-1]
    work = f"In capital letters, {reversed_word} becomes {reversed_word.upper()}."
    return "Now write that in capital letters.", _reply(work, reversed_word.upper())


def _largest_followup(item: tuple[tuple[int, ...], bool], rng: random.Random) -> Turn:
    largest = max(item[0])
    return "Which of them is the largest?", _reply(
        f"The largest number in the list is {largest}.", largest
    )


# --- Tasks, quotas and the build ------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """Where a task's items come from and how one is written as a turn."""

    items: Sequence[Any] | Callable[[random.Random], Hashable]
    """A finite list (drawn without replacement) or a function drawing one random item."""
    render: Callable[[Any, random.Random], Turn]


TASKS: dict[str, _Task] = {
    "arithmetic": _Task(_draw_arithmetic, _arithmetic),
    "reverse_word": _Task(WORDS, _reverse),
    "uppercase": _Task(SENTENCES, _uppercase),
    "lowercase": _Task(SENTENCES, _lowercase),
    "sort_numbers": _Task(_draw_sort, _sort),
    "count_words": _Task(SENTENCES, _count_words),
    "count_letters": _Task(WORDS, _count_letters),
    "antonyms": _Task(ANTONYMS, _antonym),
    "capitals": _Task(CAPITALS, _capital),
    "unit_conversion": _Task(_draw_unit, _unit),
    "definitions": _Task(DEFINITIONS, _definition),
    "list_to_sentence": _Task(_draw_list, _list_sentence),
    "thank_you_note": _Task(_draw_thanks, _thanks),
    "even_odd": _Task(lambda rng: rng.randint(10, 999), _even_odd),
}
"""Single-turn task type -> its items and renderer."""

QUOTAS: dict[str, tuple[int, int]] = {
    "arithmetic": (40, 8),
    "reverse_word": (28, 6),
    "uppercase": (20, 4),
    "lowercase": (20, 4),
    "sort_numbers": (30, 6),
    "count_words": (26, 5),
    "count_letters": (24, 5),
    "antonyms": (28, 6),
    "capitals": (34, 7),
    "unit_conversion": (30, 6),
    "definitions": (26, 5),
    "list_to_sentence": (24, 5),
    "thank_you_note": (24, 5),
    "even_odd": (20, 4),
    "multi_turn": (20, 4),
    "with_system": (20, 4),
}
"""Task type -> (train rows, held-out rows)."""

FOLLOW_UPS = (
    ("arithmetic", _times_followup),
    ("reverse_word", _caps_followup),
    ("sort_numbers", _largest_followup),
)
SYSTEM_TASKS = ("arithmetic", "even_odd", "unit_conversion", "sort_numbers", "count_letters")


class _Pool:
    """Draws a task's items without replacement, deterministically."""

    def __init__(self, name: str, task: _Task, seed: int) -> None:
        self.name, self.task = name, task
        self.rng = random.Random(f"{seed}:{name}")
        self.seen: set[Hashable] = set()
        self.queue = None if callable(task.items) else self.rng.sample(task.items, len(task.items))

    def take(self) -> Any:
        if self.queue is not None:
            if not self.queue:
                raise RuntimeError(f"task {self.name!r} ran out of hand-written items")
            return self.queue.pop()
        for _ in range(10_000):
            item = self.task.items(self.rng)
            if item not in self.seen:
                self.seen.add(item)
                return item
        raise RuntimeError(f"task {self.name!r} found no new item in 10000 draws")

    def turn(self) -> tuple[Any, Turn]:
        item = self.take()
        return item, self.task.render(item, self.rng)


def _messages(*turns: Turn, system: str | None = None) -> list[dict[str, str]]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def _split_rows(pools: dict[str, _Pool], index: int) -> list[dict[str, Any]]:
    """Rows of one split (``index`` 0 = train, 1 = held-out quota)."""
    rows = []
    for name in TASKS:
        for _ in range(QUOTAS[name][index]):
            rows.append({"messages": _messages(pools[name].turn()[1]), "task": name})
    for i in range(QUOTAS["multi_turn"][index]):
        name, follow_up = FOLLOW_UPS[i % len(FOLLOW_UPS)]
        item, first = pools[name].turn()
        second = follow_up(item, pools[name].rng)
        rows.append({"messages": _messages(first, second), "task": "multi_turn"})
    for i in range(QUOTAS["with_system"][index]):
        system, opening = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
        user, reply = pools[SYSTEM_TASKS[i % len(SYSTEM_TASKS)]].turn()[1]
        rows.append(
            {"messages": _messages((user, opening + reply), system=system), "task": "with_system"}
        )
    return rows


def build(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """Build both splits.

    Args:
        seed: Master seed; each task's pool is seeded from it and the task name.

    Returns:
        ``{"train": rows, "heldout": rows}``, each shuffled deterministically.
    """
    pools = {name: _Pool(name, task, seed) for name, task in TASKS.items()}
    heldout = _split_rows(pools, 1)  # first, so held-out items never depend on train quotas
    train = _split_rows(pools, 0)
    shuffle = random.Random(f"{seed}:shuffle")
    shuffle.shuffle(heldout)
    shuffle.shuffle(train)
    return {"train": train, "heldout": heldout}


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows as JSON lines (UTF-8, one object per line)."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate ``instructions_train.jsonl`` and ``instructions_heldout.jsonl``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for split, rows in build(args.seed).items():
        path = args.out_dir / f"instructions_{split}.jsonl"
        write_jsonl(rows, path)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
