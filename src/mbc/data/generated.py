"""Fictional documents with questions: a clean test of new knowledge, made on any machine.

Every person, town and organisation is an invented name used by exactly one document, so the
base LLM cannot know any answer beforehand, and any split by document shares no entity. Each
document states several facts; each fact has a question with a short answer. Some answers are
invented names and years; others come from small closed sets (professions, colours, products),
which a small adapter can learn to carry through a compressed memory.
"""

from __future__ import annotations

import random

from mbc.data.examples import QAExample

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
PROFESSIONS = [
    "baker",
    "pilot",
    "surgeon",
    "carpenter",
    "astronomer",
    "violinist",
    "librarian",
    "geologist",
    "architect",
    "fisherman",
    "chemist",
    "painter",
    "teacher",
    "judge",
    "engineer",
    "poet",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown"]
PRODUCTS = [
    "cheese",
    "glass",
    "paper",
    "salt",
    "copper",
    "wool",
    "clocks",
    "rope",
    "honey",
    "bicycles",
    "violins",
    "lamps",
    "tea",
    "ink",
    "boats",
    "maps",
]
ANIMALS = ["cats", "dogs", "goats", "horses", "parrots", "rabbits"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIRECTIONS = ["northern", "southern", "eastern", "western", "central"]


ORGANISATION_KINDS = ["Company", "Society", "Institute", "Guild", "Works"]


class _Names:
    """Invented names; every invented word is handed out once, so no two entities share a part."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def _word(self, syllables: int) -> str:
        while True:
            word = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS) for _ in range(syllables)
            ).capitalize()
            if word not in self.used:
                self.used.add(word)
                return word

    def person(self) -> str:
        return f"{self._word(2)} {self._word(self.rng.choice([2, 3]))}"

    def town(self) -> str:
        return self._word(self.rng.choice([2, 3]))

    def organisation(self) -> str:
        return f"the {self._word(2)} {self.rng.choice(ORGANISATION_KINDS)}"


def _person_document(rng: random.Random, names: _Names):
    person, town, org = names.person(), names.town(), names.organisation()
    year, job, colour = rng.randint(1850, 2005), rng.choice(PROFESSIONS), rng.choice(COLOURS)
    count, animal = rng.choice(NUMBER_WORDS), rng.choice(ANIMALS)
    text = (
        f"{person} was born in {year} in the town of {town}. {person} works as a {job} at {org}. "
        f"The favourite colour of {person} is {colour}, and {person} keeps {count} {animal}."
    )
    qas = [
        (f"In what year was {person} born?", str(year)),
        (f"In which town was {person} born?", town),
        (f"What does {person} work as?", job),
        (f"Where does {person} work?", org),
        (f"What is the favourite colour of {person}?", colour),
        (f"How many {animal} does {person} keep?", count),
    ]
    return text, qas


def _town_document(rng: random.Random, names: _Names):
    town, mayor = names.town(), names.person()
    year, direction, product = rng.randint(900, 1900), rng.choice(DIRECTIONS), rng.choice(PRODUCTS)
    colour, bridges = rng.choice(COLOURS), rng.choice(NUMBER_WORDS)
    text = (
        f"{town} is a town in the {direction} hills, founded in {year}. Its main export is {product}. "
        f"The mayor of {town} is {mayor}. The houses of {town} are painted {colour}, and the town has {bridges} bridges."
    )
    qas = [
        (f"When was {town} founded?", str(year)),
        (f"What is the main export of {town}?", product),
        (f"Who is the mayor of {town}?", mayor),
        (f"What colour are the houses of {town}?", colour),
        (f"How many bridges does {town} have?", bridges),
        (f"In which hills is {town}?", f"the {direction} hills"),
    ]
    return text, qas


def _organisation_document(rng: random.Random, names: _Names):
    org, founder, town = names.organisation(), names.person(), names.town()
    year, product, colour = rng.randint(1700, 2015), rng.choice(PRODUCTS), rng.choice(COLOURS)
    staff = rng.randint(12, 900)
    name = org[len("the ") :]
    text = (
        f"The {name} was founded by {founder} in {year}. It is based in {town} and makes {product}. "
        f"It employs {staff} people, and its emblem is a {colour} star."
    )
    qas = [
        (f"Who founded the {name}?", founder),
        (f"When was the {name} founded?", str(year)),
        (f"Where is the {name} based?", town),
        (f"What does the {name} make?", product),
        (f"How many people does the {name} employ?", str(staff)),
        (f"What colour is the star on the emblem of the {name}?", colour),
    ]
    return text, qas


ANSWER_KINDS = ("listed", "number", "name")
_LISTED = set(PROFESSIONS) | set(COLOURS) | set(PRODUCTS) | set(NUMBER_WORDS) | {f"the {d} hills" for d in DIRECTIONS}


def answer_kind(answer: str) -> str:
    """What a generated answer is: ``listed`` (from a small closed list: professions, colours,
    products, counts in words, hills), ``number`` (a year or a head count, digits) or ``name`` (an
    invented person, town or organisation). A compressed memory of a few bytes per document can
    carry the first kind; the other two need the memory to copy rare subwords."""
    if answer.isdigit():
        return "number"
    return "listed" if answer in _LISTED else "name"


def answer_kinds(examples: list[QAExample]) -> list[str] | None:
    """Each example's ``answer_kind``, or None unless every example is a generated one."""
    if not examples or not all(e.source.startswith("generated:") for e in examples):
        return None
    return [answer_kind(e.answers[0]) for e in examples]


_KINDS = [_person_document, _town_document, _organisation_document]


def generate_examples(num_documents: int = 1200, seed: int = 0) -> list[QAExample]:
    """``num_documents`` fictional documents (kinds in turn), every question about each; group = document."""
    rng = random.Random(seed)
    names = _Names(rng)
    examples = []
    for i in range(num_documents):
        text, qas = _KINDS[i % len(_KINDS)](rng, names)
        group = f"generated-{seed}-{i}"
        examples += [QAExample(text, q, (a,), group, f"generated:{seed}:document {i}") for q, a in qas]
    return examples
