"""Text and questions of the kinds people bring, for the "users" distillation mix (utils/training/distill_data.py).

Every row of that mix starts from one *kind*: a human-written text opening that the target continues, or a
chat question that the target answers in its chat template. Each kind names its source and licence; a
source that is not installed is skipped with its reason recorded in the cache's mix.json. Whole kinds can
be held out of training (`pretrain_draft_model.py --heldout-kinds`), so the held-out figure measures kinds
the draft never saw, not unseen rows of seen kinds.

Sources, all reachable without a model hub:
- the suite's own prompts/builtin.jsonl, rows 12-71 only (rows 0-11 are the evaluation range);
- the original project's LLaVA-Instruct rows (../shared/original/instruct150k_subset.json, CC BY-NC 4.0 like
  LLaVA-Instruct-150K): their human turns, image tags removed, several turns where the row has them;
- test data shipped in the gensim wheel on PyPI (`pip install --no-deps gensim`; LGPL-2.1): the Lee corpus
  of Australian Broadcasting Corporation news (distributed with gensim for research) and a shortened
  English Wikipedia dump (CC BY-SA);
- Python's own documentation topics (pydoc_data, in every CPython; PSF licence);
- questions the target writes itself from one seed instruction per chat kind (SEED_REQUESTS below).
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILTIN_PROMPTS = REPO / "prompts" / "builtin.jsonl"
ORIGINAL_DATA = REPO.parent / "shared" / "original"
FIRST_TRAINING_BUILTIN_ROW = 12   # rows 0-11 of prompts/builtin.jsonl are the evaluation range

# chat kinds whose questions the target writes itself: kind -> what the user's message should be
SEED_REQUESTS = {
    "writing": "a request to write something creative, such as a story, a poem, a letter or a speech",
    "roleplay": "a request for the assistant to play a character or a role and answer in that role",
    "reasoning": "a puzzle or a question that needs careful step-by-step reasoning",
    "math": "a math word problem or a calculation to work out",
    "coding": "a programming task or a question about a piece of code",
    "extraction": "a short text followed by a request to extract, list or summarize facts from it",
    "knowledge": "a factual question about science, history, geography or culture",
}
SEED_INSTRUCTION = ("Write one message that a user might send to an AI assistant: {request}, about {topic}. "
                    "Write only the user's message, nothing else.")


@dataclass(frozen=True)
class Kind:
    """One kind of row: `style` "text" (an opening continued as plain text) or "chat" (questions answered in
    the chat template; "selfq" kinds have the target write the question first); `weight` its share of rows."""

    name: str
    style: str
    weight: float
    source: str


KINDS = (
    Kind("builtin-news", "text", 0.05, "prompts/builtin.jsonl rows 12-71, news openings (written for this suite)"),
    Kind("builtin-web", "text", 0.05, "prompts/builtin.jsonl rows 12-71, web-page openings (written for this suite)"),
    Kind("news", "text", 0.10, "gensim test data: Lee corpus, ABC news articles"),
    Kind("encyclopedic", "text", 0.08, "gensim test data: shortened English Wikipedia dump (CC BY-SA)"),
    Kind("technical", "text", 0.10, "CPython's pydoc_data topics: the Python reference documentation (PSF)"),
    Kind("builtin-chat", "chat", 0.06, "prompts/builtin.jsonl rows 12-71, chat questions (written for this suite)"),
    Kind("instruct150k", "chat", 0.14, "../shared/original/instruct150k_subset.json human turns (CC BY-NC 4.0)"),
) + tuple(Kind(name, "selfq", 0.06 if name not in ("roleplay", "extraction") else 0.05,
               f"questions the target writes from: {request}") for name, request in SEED_REQUESTS.items())
KIND_NAMES = tuple(kind.name for kind in KINDS)


@dataclass(frozen=True)
class Item:
    """What one row starts from: a text opening (`text`), or chat turns (`turns`: the user's messages in order,
    answered one after another), or for a selfq kind the instruction that makes the target write the question."""

    kind: str
    text: str = ""
    turns: tuple[str, ...] = ()
    instruction: str = ""


def _gensim_data() -> Path | None:
    """gensim's test-data folder, found without importing gensim (it needs packages the suite does not)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    return folder if folder.is_dir() else None


def _builtin_rows(kind: str) -> list[str]:
    rows = [json.loads(line) for line in BUILTIN_PROMPTS.read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows[FIRST_TRAINING_BUILTIN_ROW:] if row.get("kind") == kind]


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, references, files and categories dropped, links
    reduced to their shown text, headings kept as lines."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(6):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    for _ in range(3):
        text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("*", "#", "|", "!", ":", ";", "{", "}"))]
    return "\n\n".join(lines)


def _wikipedia(folder: Path) -> list[str]:
    raw = bz2.open(folder / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "rt",
                   encoding="utf-8").read()
    pages = re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)
    texts = [clean_wikitext(page) for page in pages if not page.lstrip().upper().startswith("#REDIRECT")]
    return [text for text in texts if len(text) > 800]


def _python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [text.strip() for text in topics.values() if len(text) > 600]


def _instruct_turns() -> list[tuple[str, ...]]:
    rows = json.loads((ORIGINAL_DATA / "instruct150k_subset.json").read_text())
    out = []
    for row in rows:
        turns = tuple(re.sub(r"\s*<image>\s*", " ", turn["value"]).strip()
                      for turn in row.get("conversations", []) if turn.get("from") == "human")
        if turns and turns[0]:
            out.append(turns)
    return out


class SourceMissing(Exception):
    """A kind's source is not installed here; the message says how to get it."""


@lru_cache(maxsize=None)
def _material(kind: str) -> tuple:
    """The texts (text kinds) or turn tuples (chat kinds) of one kind; raises SourceMissing with the reason."""
    if kind in ("builtin-news", "builtin-web"):
        return tuple(_builtin_rows(kind.split("-")[1]))
    if kind == "builtin-chat":
        return tuple((text,) for text in _builtin_rows("chat"))
    if kind == "technical":
        return tuple(_python_docs())
    if kind == "instruct150k":
        if not (ORIGINAL_DATA / "instruct150k_subset.json").is_file():
            raise SourceMissing(f"{ORIGINAL_DATA / 'instruct150k_subset.json'} not found")
        return tuple(_instruct_turns())
    if kind in ("news", "encyclopedic"):
        folder = _gensim_data()
        if folder is None:
            raise SourceMissing("gensim's test data not installed: pip install --no-deps gensim")
        if kind == "news":
            return tuple(line.strip() for line in (folder / "lee_background.cor").read_text().splitlines()
                         if len(line.strip()) > 300)
        return tuple(_wikipedia(folder))
    raise KeyError(kind)


def available_kinds(names: tuple[str, ...] = KIND_NAMES) -> tuple[dict[str, float], dict[str, str]]:
    """({kind: weight} of the kinds whose sources are here, {kind: why not} for the rest)."""
    weights, missing = {}, {}
    for kind in KINDS:
        if kind.name not in names:
            continue
        if kind.style != "selfq":
            try:
                if not _material(kind.name):
                    raise SourceMissing("its source holds no usable row")
            except SourceMissing as exc:
                missing[kind.name] = str(exc)
                continue
        weights[kind.name] = kind.weight
    return weights, missing


def style_of(kind: str) -> str:
    return next(k.style for k in KINDS if k.name == kind)


def opening(text: str, rng: random.Random, min_chars: int = 120, max_chars: int = 900) -> str:
    """A human-written opening: the text's start (or, half the time in a long text, a paragraph's start), cut
    after the sentence that passes a random length, so the target continues from a natural boundary."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    start = 0
    starts = [i for i, p in enumerate(paragraphs[1:-1], 1) if p[:1].isupper()]  # not mid-sentence
    if len(paragraphs) > 3 and starts and rng.random() < 0.5:
        start = rng.choice(starts)
    body = "\n\n".join(paragraphs[start:])
    limit = rng.randint(min_chars, max_chars)
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", body):
        out = f"{out} {sentence}" if out else sentence
        if len(out) >= limit:
            break
    return out[:max_chars * 2].strip()


def draw_items(rng: random.Random, n: int, weights: dict[str, float], topics: list[str]) -> list[Item]:
    """n row starts, kinds drawn by `weights`; `topics` fill the selfq kinds' seed instructions."""
    names = sorted(weights)
    kinds = rng.choices(names, weights=[weights[name] for name in names], k=n)
    items = []
    for kind in kinds:
        style = style_of(kind)
        if style == "selfq":
            items.append(Item(kind, instruction=SEED_INSTRUCTION.format(request=SEED_REQUESTS[kind],
                                                                       topic=rng.choice(topics))))
        elif style == "chat":
            items.append(Item(kind, turns=rng.choice(_material(kind))))
        else:
            items.append(Item(kind, text=opening(rng.choice(_material(kind)), rng)))
    return items
