"""Haystack text sources for the recall tasks and the NIAH grid.

A haystack is an endless, deterministic stream of text *units* (sentences, or short
chunks for run-on text) joined by ``joiner``. The length fitting in
:mod:`hybrid_distill.tasks.base` takes the first ``n`` units of a stream,
so every stream must be prefix-stable: ``take(n)`` is always a prefix of ``take(n + 1)``.

Sources:

* :class:`NoiseHaystack` -- repeated fixed sentences, the same for every seed: RULER's noise
  ``The grass is green. The sky is blue. ...`` (``"noise"``) or, for documents of the
  ``train`` template family, other sentences of the same kind (``"train_noise"``).
* :class:`ProseHaystack` -- seeded pseudo-prose from the embedded word lists. It contains
  no digits, hyphens or upper-case words, so numbers, uuids, hyphenated keys and ``VAR``
  names never collide with it.
* :class:`TextHaystack` -- sentences from a list of strings. Each sample starts at a seeded
  sentence and wraps around. Corpora on disk (a file, a folder, the embedded default corpus)
  are read by :func:`hybrid_distill.data.read_haystack`, which returns one of these.

:func:`resolve_haystack` turns a spec (``None``, ``"noise"``, ``"train_noise"``, ``"prose"``,
a list of strings or a :class:`Haystack`) into a source.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import cycle

# ---------------------------------------------------------------------------------------
# Embedded word lists (lower-case ASCII letters only). Keys are ``adjective-noun``.


def _words(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text.split()))


ADJECTIVES = _words(
    """
    able absent acidic active adorable afraid agile airy alert alive amber ample ancient angry
    anxious arctic arid awake awful bad bald basic bitter bland blank bleak blind blond blue
    bold bony bored bossy brave brief bright brisk broad broken bronze brown bumpy busy calm
    candid careful casual cheap cheerful chilly chubby civil classic clean clever cloudy clumsy
    coarse cold common cosmic costly cozy crafty crazy creamy crisp crooked crowded cruel
    curious curly cute damp dark dear decent deep dense dirty dizzy dry dull dusty eager early
    earnest easy elastic elder electric elegant empty endless epic equal exact exotic faint
    fair faithful famous fancy far fast fearless feeble fierce filthy fine firm flat fluffy
    fond foolish formal fragile frail free fresh friendly frosty frozen funny fuzzy gentle
    giant gifted glad gleaming glossy golden good graceful grand grassy gray greasy great
    greedy green grim gritty grumpy guilty hairy handy happy hardy harsh hasty healthy heavy
    helpful hidden high hollow honest hot huge humble hungry icy ideal idle illegal immense
    jolly joyful juicy keen kind large late lazy lean legal level light limp little lively
    lonely long loose loud lovely loyal lucky lumpy mad magnetic major massive mature meager
    mellow messy mighty mild minor misty modern modest moist muddy murky narrow nasty neat
    needy nervous new nice nimble noble noisy normal nosy numb odd old open orange ornate
    pale patient peaceful perfect petite pink plain plastic pleasant plump polite poor
    portly precious pretty prickly proud pure purple quaint quick quiet radiant rapid rare
    raw ready real regal rich rigid ripe robust rocky rosy rough round royal rude rural rusty
    sad safe salty sandy scarce scary secret serene shabby shaggy shallow sharp shiny short
    shy silent silky silly silver simple sleepy slim slow small smart smooth snowy soft solid
    sour spicy spiky splendid spotty square stale steady steep sticky stiff stormy strange
    strict strong sturdy subtle sunny super sweet swift tall tame tender tense thick thin
    thirsty tidy tiny tired tough tricky true twin ugly uneven upset urban vacant vague vain
    valid vast velvet violet vivid warm wary weak weary wet whole wicked wide wild windy wise
    witty wooden worried yellow young zany zealous
    """
)

NOUNS = _words(
    """
    acorn actor airport album anchor angle animal ankle apple apron arch arena arrow artist
    attic avenue badge bagel bakery ball balloon bamboo banana band banner barn basket bath
    beach beacon bean bear beard bed bee beetle bell belt bench berry bicycle bird blanket
    blossom boat bone book boot bottle boulder bowl box branch bread brick bridge brook broom
    bubble bucket buffalo bugle bull bundle butter button cabin cactus cake camel camera
    canal candle canoe canyon captain car carpet carrot castle cat cave cellar chair chalk
    cheese cherry chest chicken chimney circle city cliff clock cloud clover coat coin comet
    compass cookie copper coral cotton cottage country cousin cow crane crater crayon creek
    crow crown crystal cup curtain cushion daisy desert desk diamond dinner dog doll dolphin
    donkey door dragon drawer dream drum duck eagle earth echo engine envelope falcon farm
    feather fence fern field fiddle finger fire fish flag flame flower flute fog forest fork
    fountain fox frog fruit galaxy garden gate ghost giraffe glacier glass glove goat goose
    grape guitar hammer harbor harp hat hawk helmet hill honey horizon horse house island
    jacket jaguar jar jelly jewel kettle key kitchen kite kitten ladder lake lamp lantern
    lemon letter library lily lion lizard lobster lock magnet mango map maple marble market
    meadow melon mirror monkey moon mountain mouse mushroom needle nest night notebook ocean
    octopus olive onion orchard otter owl oyster paddle palace panda paper parrot peach pear
    pebble pencil penguin pepper piano pigeon pillow pine planet plum pocket pond potato
    prairie pumpkin puppet puzzle quilt rabbit raccoon radio rain rainbow raven ribbon river
    robin rocket roof rose saddle sail salmon sand scarf school seal shadow shell ship shoe
    shovel silk skate sky sled snail snake sock sofa spider spoon squirrel stable star statue
    stone storm stream street sugar summit sun swan sweater table tent thunder tiger toast
    tomato tower tractor train tree trumpet tulip tunnel turtle umbrella valley vase violin
    volcano wagon wallet walnut wave whale wheel whistle willow window wolf wool yacht zebra
    """
)

VERBS = _words(
    """
    admired answered arranged asked avoided balanced borrowed built buried called carried
    chased cleaned climbed collected counted covered crossed danced delivered described
    discovered drew dropped enjoyed explored fetched filled folded followed found gathered
    guarded guided hid hugged ignored imagined joined kept lifted listened loved measured
    mended missed moved noticed opened ordered painted passed picked planted played polished
    pulled pushed raised reached remembered repaired rescued returned sang saved searched
    shared showed signed sketched sorted spotted studied surprised swept taught tested
    touched traced trusted turned visited waited walked warmed washed watched welcomed
    wished wrapped wrote
    """
)

ADVERBS = _words(
    """
    afterwards almost always briefly calmly carefully cheerfully clearly closely eagerly
    easily finally gently gladly gracefully happily honestly loudly merely mostly neatly
    nearly often openly patiently politely quickly quietly rarely really seldom silently
    simply slowly softly sometimes soon suddenly swiftly today together warmly weekly
    """
)

PREPOSITIONS = _words("across after along among around behind below beside beyond near over past under")

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Filler of the same kind for the ``train`` template family: no sentence (or 6-word run) in common with RULER's.
TRAIN_NOISE_SENTENCES = (
    "The river is wide.",
    "The stone is cold.",
    "The moon is pale.",
    "On we walk.",
    "Up the hill and down.",
)

# ---------------------------------------------------------------------------------------


class UnitStream:
    """Lazily materialised, prefix-stable list of haystack units."""

    def __init__(self, units: Iterator[str], joiner: str = " "):
        self._it = units
        self._units: list[str] = []
        self.joiner = joiner

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            self._units.append(next(self._it))
        return self._units[:n]

    def text(self, n: int) -> str:
        return self.joiner.join(self.take(n))

    def continuation(self, n: int, min_chars: int = 256) -> str:
        """Text that follows unit ``n`` (joiner first): what trimming may append after ``take(n)``."""
        parts: list[str] = []
        size, k = 0, n
        while size < min_chars:
            unit = self.take(k + 1)[k]
            parts.append(self.joiner + unit)
            size += len(parts[-1])
            k += 1
        return "".join(parts)


class Haystack:
    """Base class: a named source of seeded unit streams."""

    name = "haystack"
    joiner = " "

    def stream(self, seed: int) -> UnitStream:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NoiseHaystack(Haystack):
    """Fixed sentences repeated (identical for every seed): RULER's noise by default."""

    def __init__(self, sentences: Sequence[str] = NOISE_SENTENCES, name: str = "noise"):
        self.sentences = tuple(sentences)
        self.name = name

    def stream(self, seed: int) -> UnitStream:
        return UnitStream(cycle(self.sentences), self.joiner)


def _prose_sentence(rng: random.Random) -> str:
    a, n, v, adv, p = ADJECTIVES, NOUNS, VERBS, ADVERBS, PREPOSITIONS
    c = rng.choice
    forms = (
        lambda: f"The {c(a)} {c(n)} {c(v)} the {c(n)} {c(p)} the {c(a)} {c(n)}.",
        lambda: f"{c(adv).capitalize()}, the {c(a)} {c(n)} {c(v)} a {c(n)} {c(p)} the {c(n)}.",
        lambda: f"Every {c(n)} that {c(v)} the {c(n)} was {c(a)} and {c(a)}.",
        lambda: f"It was {c(a)} when the {c(n)} {c(adv)} {c(v)} the {c(a)} {c(n)}.",
        lambda: f"Nobody knew why the {c(n)} {c(v)} the {c(n)} {c(p)} the {c(a)} {c(n)}.",
        lambda: f"In the {c(a)} {c(n)}, the {c(n)} {c(v)} {c(adv)}.",
        lambda: f"My {c(n)} {c(v)} the {c(a)} {c(n)}, and the {c(n)} {c(v)} it {c(adv)}.",
        lambda: f"They {c(v)} the {c(n)} because it seemed {c(a)}.",
        lambda: f"Later the {c(a)} {c(n)} {c(v)} every {c(n)} {c(p)} the {c(n)}.",
    )
    return c(forms)()


class ProseHaystack(Haystack):
    """Seeded pseudo-prose: grammatical nonsense sentences from the embedded word lists."""

    name = "prose"

    def stream(self, seed: int) -> UnitStream:
        rng = random.Random(seed)

        def gen() -> Iterator[str]:
            while True:
                yield _prose_sentence(rng)

        return UnitStream(gen(), self.joiner)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Whitespace-collapsed sentences of ``text``; run-ons longer than ``max_chars`` are cut at spaces."""
    text = " ".join(text.split())
    out: list[str] = []
    for sent in _SENT_SPLIT.split(text):
        while len(sent) > max_chars:
            cut = sent.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(sent[:cut])
            sent = sent[cut:].lstrip()
        if sent:
            out.append(sent)
    return out


class TextHaystack(Haystack):
    """Sentences of given texts; each seed starts at a random sentence and wraps around."""

    def __init__(self, texts: Iterable[str], name: str = "texts", max_chars: int = 300):
        sentences: list[str] = []
        for t in texts:
            sentences.extend(split_sentences(t, max_chars))
        if not sentences:
            raise ValueError(f"haystack {name!r} has no text")
        self.sentences: tuple[str, ...] = tuple(sentences)
        self.name = name

    def stream(self, seed: int) -> UnitStream:
        start = random.Random(seed).randrange(len(self.sentences))
        s = self.sentences

        def gen() -> Iterator[str]:
            i = start
            while True:
                yield s[i % len(s)]
                i += 1

        return UnitStream(gen(), self.joiner)


NAMED_HAYSTACKS = {
    "noise": lambda: NoiseHaystack(NOISE_SENTENCES, "noise"),
    "train_noise": lambda: NoiseHaystack(TRAIN_NOISE_SENTENCES, "train_noise"),
    "prose": ProseHaystack,
}


def resolve_haystack(spec: str | Sequence[str] | Haystack | None, default: str = "prose") -> Haystack:
    """Turn a haystack spec into a :class:`Haystack`.

    ``None`` -> ``default``; a name of ``NAMED_HAYSTACKS`` (``"noise"``, ``"train_noise"``,
    ``"prose"``); a list/tuple of strings; or a :class:`Haystack` instance (returned as is).
    Any other string names a corpus, which :func:`hybrid_distill.data.read_haystack` reads.
    """
    if spec is None:
        spec = default
    if isinstance(spec, Haystack):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s in NAMED_HAYSTACKS:
            return NAMED_HAYSTACKS[s]()
        raise ValueError(
            f"haystack {s!r} is not one of {sorted(NAMED_HAYSTACKS)}; a corpus (file, folder or 'default:prose') "
            f"is read with hybrid_distill.data.read_haystack({s!r}), whose result can be passed as the haystack"
        )
    if isinstance(spec, Sequence) and all(isinstance(t, str) for t in spec):
        return TextHaystack(spec)
    raise TypeError(f"cannot use {spec!r} as a haystack")
