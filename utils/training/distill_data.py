"""Distillation data written by the target itself, cached on disk so a rerun reuses it.

A draft is only useful if it predicts what the *target* will write, so its training text comes from the
target: chat answers to instructions (half written by the target itself, magpie-style: the target
continues "<|im_start|>user\\n" to invent a request, then answers it; half from templates over topics
written here) and plain-text continuations of short seeds. Rows are decoded greedily or sampled at
a few temperatures, so the draft sees both the target's argmax path and its spread. For every token the
target wrote we also keep its top-k next-token log-probabilities (at temperature 1), so logit
distillation needs no second teacher pass.

None of the suite's evaluation prompts (prompts/builtin.jsonl) are used: every seed is generated here.

Data lives in shards (one decoded batch each) under `cache_dir()/distill/<key>/`, where the key hashes
every setting that changes the text; shard i is seeded by (seed, i), so asking for more tokens later only
adds shards, and an interrupted run keeps the shards it finished.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from transformers import StaticCache

from engine.model import TreeModel
from engine.packed_decoding import Decoded, decode_packed, pick_next
from engine.linear_paths import KernelPlan
from utils.errors import UserError
from utils.experiment import eos_ids_of, load_pair
from utils.models import cache_dir, resolve_model_path
from utils.training.user_sources import available_kinds, draw_items

SHARD_PREFIX = "shard-"
# Finished rows stay in the batch (as dead weight) until only this share is left alive; then the cache is
# compacted. Compacting on every finished row would copy the whole cache over and over.
PRUNE_AT = 0.8
MARK = "\u0000SEED\u0000"

TOPICS = """
volcanoes;the French Revolution;photosynthesis;machine learning;the stock market;black holes;healthy sleep;
climate change;the Roman Empire;honey bees;electric cars;the human heart;chess openings;baking bread;
renewable energy;the internet;ancient Egypt;vaccines;coral reefs;the moon landing;time management;
quantum computing;coffee;the Renaissance;earthquakes;rainforests;democracy;social media;the water cycle;
dinosaurs;personal finance;the immune system;jazz music;the printing press;meditation;recycling;
the solar system;world war one;gardening;cybersecurity;the Olympic games;artificial intelligence;
friendship;public speaking;the Great Wall of China;ocean currents;nutrition;video games;inflation;
the Industrial Revolution;tea;marathon training;photography;bacteria;the theory of evolution;
job interviews;electricity;the Amazon river;cloud computing;origami;mountain climbing;learning a language;
the printing of money;penguins;wind turbines;the Silk Road;DNA;remote work;volunteering;comets;
the history of mathematics;sorting algorithms;Python programming;databases;the metric system;chocolate;
urban planning;bicycles;the brain;glaciers;first aid;writing a resume;the Moon;plastic pollution;
ancient Greece;elephants;hurricanes;the economy of Japan;smartphones;pizza;yoga;the color of the sky;
friendship between cats and dogs;saving for retirement;the Eiffel Tower;tsunamis;robots;camping;
the periodic table;Shakespeare;gravity;email etiquette;the speed of light;migrating birds;
""".replace("\n", "").split(";")
TOPICS = [t.strip() for t in TOPICS if t.strip()]

INSTRUCTION_TEMPLATES = [
    "Explain {t} in simple terms.", "Write a short essay about {t}.", "What are the main facts about {t}?",
    "Give me five interesting facts about {t}.", "Write a short story that involves {t}.",
    "Summarize the history of {t} in a few paragraphs.", "What are the pros and cons of {t}?",
    "How would you explain {t} to a ten-year-old?", "Write a poem about {t}.",
    "List some common misconceptions about {t}.", "Why is {t} important?",
    "Write a blog post introduction about {t}.", "Give me a step-by-step guide related to {t}.",
    "What questions do people often ask about {t}? Answer three of them.",
    "Compare {t} and {u}.", "Write an email to a friend about {t}.", "Describe {t} in detail.",
    "What would happen if {t} disappeared?", "Create a quiz with three questions about {t}.",
    "Write a Python function related to {t} and explain it.",
]

TEXT_SEEDS = [
    "The history of {t}", "{T} is", "Here is a short article about {t}.\n\n",
    "Chapter 1\n\nThe morning I learned about {t}", "Frequently asked questions about {t}\n\nQ:",
    "In this lesson, we will learn about {t}.", "Scientists have recently discovered that {t}",
    "A beginner's guide to {t}\n\n", "Dear diary, today I read about {t}.",
    "Ten things you should know about {t}:\n1.", "Many people believe that {t}",
]

# Openers of news, web and forum pages (written here, like the topics): with `text_style="articles"` the
# plain-text rows start from these, so the draft also sees the target continuing article-like pages.
ARTICLE_SEEDS = [
    "{C} -- Officials said on {D} that a new plan for {t} would",
    "By {N}, Staff Reporter\n\nA report published this week on {t} has",
    "Review: What I Learned After a Year of {t}\n\n",
    "Forum: General Discussion > {T}\n\nSubject: A question about {t}\n\nHi everyone,",
    "How to Get Started With {t}\n\nIf you have ever wondered about {t}, you are not alone.",
    "{T}: A Complete Guide for Beginners\n\n", "Opinion | Why {t} matters more than ever\n\nBy {N}\n\n",
    "{C} -- Residents gathered on {D} evening to discuss {t}, and",
    "FOR IMMEDIATE RELEASE\n\n{C} -- A local company announced today a new project on {t}.",
    "Interview: {N} answers our readers' questions about {t}\n\nQ:",
    "My honest thoughts on {t}, one year later\n\nWhen I first", "Product description: The {T} Starter Kit\n\n",
    "{C} ({D}) -- Researchers at the city university say that {t}",
    "Weekend reading: {t}\n\nEvery week we pick one subject and explain it properly. This week:",
    "Letters to the editor\n\nSir, I read your recent article about {t} with interest, but",
    "Travel diary, day three\n\nWe woke up early because the guide had promised to show us {t}.",
]
CITIES = ["Millbrook", "PORT ELLIS", "Dunmore", "CASTLEFORD", "Oakridge", "Lakeview", "Brampton", "Westbury"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = ["Anna Kowalski", "David Osei", "Laura Brennan", "Tom Hartley", "Priya Nair", "Marco Ruiz", "Jin Park"]


@dataclass(frozen=True)
class DistillSettings:
    """Everything that changes the generated text (and so the cache key)."""

    target: str | None = None
    temperatures: tuple[float, ...] = (0.0, 0.0, 0.7, 1.0)
    max_new_tokens: int = 256
    instruction_max_tokens: int = 64
    instruction_temperature: float = 0.9
    magpie_fraction: float = 0.45
    template_fraction: float = 0.35
    top_k: int = 16
    batch_size: int = 128
    dtype: str = "bfloat16"
    seed: int = 1234
    text_style: str = "seeds"   # plain-text rows start from TEXT_SEEDS ("seeds") or ARTICLE_SEEDS ("articles");
    # "users": rows of the kinds in utils/training/user_sources.py (human-written openings, chat questions)
    generator: str = "hf"       # "hf": transformers in `dtype`, left-padded batches; "packed": the suite's engine
    # on `linear_path` ("gguf": float32, the target's own numerics; "q8": 8-bit activations), continuously batched
    # over `lanes` sequences
    linear_path: str = "plain"
    lanes: int = 64

    def key(self) -> str:
        """Folder name for this setting: the target's resolved path is hashed in, not just its name.

        Fields added after the first version enter the hash only when set away from their default, so the
        caches written before they existed keep their keys."""
        data = asdict(self) | {"target": resolve_model_path(self.target), "version": 1}
        for name in LATER_FIELDS:
            if data[name] == DistillSettings.__dataclass_fields__[name].default:
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def folder(self) -> Path:
        return cache_dir() / "distill" / self.key()


# DistillSettings fields added after the first version (see `key`)
LATER_FIELDS = ("text_style", "generator", "linear_path", "lanes")

DISTILL_MIXES = {
    "chat": DistillSettings(),
    # mostly plain text from article-like openers, for drafts that must follow the target on web/news pages
    "articles": DistillSettings(magpie_fraction=0.1, template_fraction=0.2, text_style="articles"),
    # human-written openings and chat questions of common kinds (user_sources.KINDS), multi-turn where the source
    # has turns: the kinds of prompts people bring. Written by the target on the q8 path (8-bit activations,
    # llama.cpp's numerics: ~2x the rows per second of float32; the training labels are the float target's own)
    "users": DistillSettings(text_style="users", generator="packed", linear_path="q8", dtype="float32",
                             max_new_tokens=192, instruction_max_tokens=96, batch_size=256),
}


@dataclass
class DistillData:
    """Concatenated shards: `tokens[offsets[i]:offsets[i+1]]` is row i.

    `teacher[t]` is true when token t was written by the target; then `topk_ids[t]`/`topk_logprobs[t]`
    hold the target's distribution that token t was drawn from (given tokens < t).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    teacher: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    greedy: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U16"))  # per row; "" where unknown

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_teacher_tokens(self) -> int:
        return int(self.teacher.sum())

    def rows(self, indices: list[int] | np.ndarray) -> "DistillData":
        """A subset of rows (used to split off held-out data)."""
        parts = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        take = np.concatenate([np.arange(a, b) for a, b in parts]) if parts else np.zeros(0, dtype=np.int64)
        lengths = np.array([b - a for a, b in parts], dtype=np.int64)
        return DistillData(self.tokens[take], np.concatenate([[0], np.cumsum(lengths)]), self.teacher[take],
                           self.topk_ids[take], self.topk_logprobs[take],
                           self.greedy[np.asarray(indices, dtype=np.int64)] if len(self.greedy) else self.greedy,
                           self.kinds[np.asarray(indices, dtype=np.int64)] if len(self.kinds) else self.kinds)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _chat_pieces(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the user's text (with the assistant header)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(MARK)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def _topic_text(rng: random.Random, template: str, article_names: bool) -> str:
    """The template filled with two topics and, for the articles mix, a city, a day and a name. The extra
    draws happen only for that mix, so the "chat" mix's random stream (and its cached shards) stays the same
    as before ARTICLE_SEEDS existed."""
    t, u = rng.sample(TOPICS, 2)
    names = dict(C=rng.choice(CITIES), D=rng.choice(DAYS), N=rng.choice(NAMES)) if article_names else {}
    return template.format(t=t, u=u, T=t[:1].upper() + t[1:], **names)


def _plan_rows(rng: random.Random, n: int, settings: DistillSettings, has_chat: bool) -> list[str]:
    """Kind of each row: magpie (target-written request), template (chat request from here) or text."""
    kinds = []
    for _ in range(n):
        x = rng.random()
        if has_chat and x < settings.magpie_fraction:
            kinds.append("magpie")
        elif has_chat and x < settings.magpie_fraction + settings.template_fraction:
            kinds.append("template")
        else:
            kinds.append("text")
    return kinds


# ---------------------------------------------------------------------------------------------------------
# Batched decoding that keeps the target's top-k log-probs


def _compact(cache: StaticCache, rows: torch.Tensor) -> None:
    """Keep only `rows` of a static KV cache (transformers offers this for dynamic caches only)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
        layer.batch_size = len(rows)


@torch.inference_mode()
def decode_batch(model, prompts: list[list[int]], temps: list[float], max_new: int, stop_id: int | None,
                 top_k: int, pad_id: int, gen: torch.Generator) -> list[Decoded]:
    """Left-padded batched decoding with a preallocated KV cache; finished rows are dropped as it goes.

    Written here rather than through `generate` because we keep top-k log-probs of every step and
    prune finished rows (the long tail of one long answer would otherwise cost a whole batch per step).
    A static cache matters on CPU: a growing one reallocates every layer's cache every step, which
    fragments memory (gigabytes of RSS per worker) and slows decoding.
    """
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    temp_t = torch.tensor(temps, dtype=torch.float32)
    results = [Decoded() for _ in range(n)]
    alive = torch.arange(n)
    cache = StaticCache(config=model.config, max_cache_len=width + max_new)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    next_pos = positions[:, -1] + 1
    logits = out.logits[:, -1].float()
    for step in range(max_new):
        logprobs = torch.log_softmax(logits, -1)
        top_lp, top_ids = logprobs.topk(top_k, -1)
        nxt = pick_next(logits, top_ids[:, 0], temp_t[alive], gen)
        keep = []
        for j, row in enumerate(alive.tolist()):
            r = results[row]
            if r.finished:
                continue
            r.tokens.append(int(nxt[j]))
            r.topk_ids.append(top_ids[j].numpy().astype(np.int32))
            r.topk_logprobs.append(top_lp[j].numpy().astype(np.float16))
            if stop_id is not None and int(nxt[j]) == stop_id:
                r.finished = True
            else:
                keep.append(j)
        if not keep or step + 1 >= max_new:
            break
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=torch.long)], -1)
        if len(keep) <= len(alive) * PRUNE_AT:
            sel = torch.tensor(keep)
            _compact(cache, sel)
            alive, nxt, mask, next_pos = alive[sel], nxt[sel], mask[sel], next_pos[sel]
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    cache=cache, use_cache=True)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    return results


# ---------------------------------------------------------------------------------------------------------
# Shards


def _row_arrays(tokens: list[int], spans: list[tuple[int, Decoded]], k: int) -> dict[str, np.ndarray]:
    """Per-token arrays of one row; `spans` are (start index, decoded piece) of target-written tokens."""
    n = len(tokens)
    teacher = np.zeros(n, dtype=bool)
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.zeros((n, k), dtype=np.float16)
    for start, piece in spans:
        m = len(piece.tokens)
        teacher[start:start + m] = True
        ids[start:start + m] = np.stack(piece.topk_ids)
        lps[start:start + m] = np.stack(piece.topk_logprobs)
    return {"tokens": np.asarray(tokens, dtype=np.int32), "teacher": teacher, "topk_ids": ids, "topk_logprobs": lps}


def _stack_rows(parts: list[dict[str, np.ndarray]], row_temps: list[float]) -> dict[str, np.ndarray]:
    """One shard from rows' per-token arrays: concatenated, with row offsets and which rows were greedy."""
    lengths = np.array([len(p["tokens"]) for p in parts], dtype=np.int64)
    shard = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    shard["offsets"] = np.concatenate([[0], np.cumsum(lengths)])
    shard["greedy"] = np.array([t == 0 for t in row_temps], dtype=bool)
    return shard


def generate_shard(model, tokenizer, settings: DistillSettings, index: int) -> dict[str, np.ndarray]:
    """One batch of rows, reproducible from (seed, index)."""
    rng = random.Random(settings.seed * 1_000_003 + index)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    if settings.text_style == "users":
        return user_shard(model, tokenizer, settings, rng, gen)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    n = settings.batch_size
    kinds = _plan_rows(rng, n, settings, has_chat)
    temps = [rng.choice(settings.temperatures) for _ in range(n)]
    before, after = _chat_pieces(tokenizer) if has_chat else ([], [])
    articles = settings.text_style == "articles"

    magpie_rows = [i for i, kind in enumerate(kinds) if kind == "magpie"]
    requests: dict[int, Decoded] = {}
    if magpie_rows:
        asked = decode_batch(model, [before] * len(magpie_rows), [settings.instruction_temperature] * len(magpie_rows),
                             settings.instruction_max_tokens, eos, settings.top_k, pad, gen)
        requests = {row: piece for row, piece in zip(magpie_rows, asked) if piece.finished and len(piece.tokens) > 3}

    rows, prompts, row_temps = [], [], []
    for i, kind in enumerate(kinds):
        if kind == "magpie":
            if i not in requests:
                continue
            prompt = before + requests[i].tokens + after[1:] if after[:1] == [eos] else \
                before + requests[i].tokens + after
            spans = [(len(before), requests[i])]
        elif kind == "template":
            text = _topic_text(rng, rng.choice(INSTRUCTION_TEMPLATES), articles)
            prompt, spans = before + tokenizer(text, add_special_tokens=False)["input_ids"] + after, []
        else:
            seeds = ARTICLE_SEEDS if articles else TEXT_SEEDS
            prompt = tokenizer(_topic_text(rng, rng.choice(seeds), articles), add_special_tokens=False)["input_ids"]
            spans = []
        rows.append((prompt, spans))
        prompts.append(prompt)
        row_temps.append(temps[i])
    answers = decode_batch(model, prompts, row_temps, settings.max_new_tokens, eos, settings.top_k, pad, gen)

    return _stack_rows([_row_arrays(prompt + ans.tokens, spans + [(len(prompt), ans)], settings.top_k)
                        for (prompt, spans), ans in zip(rows, answers)], row_temps)


def _turn_pieces(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Chat-template token ids before the first user message, after a user message (through the assistant
    header), and between an assistant answer's stop token and the next user message."""
    before, after = _chat_pieces(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\u0000A\u0000"},
                                          {"role": "assistant", "content": "\u0000B\u0000"},
                                          {"role": "user", "content": "\u0000C\u0000"}], tokenize=False)
    between = tokenizer(text.split("\u0000B\u0000")[1].split("\u0000C\u0000")[0],
                        add_special_tokens=False)["input_ids"]
    return before, after, between[1:] if between[:1] == [tokenizer.eos_token_id] else between


def user_shard(model: TreeModel, tokenizer, settings: DistillSettings, rng: random.Random,
               gen: torch.Generator) -> dict[str, np.ndarray]:
    """One batch of the "users" mix: kinds drawn by weight (user_sources.KINDS); selfq kinds first have the
    target write the question, chat rows with more turns get each next turn after the target's answer. Every
    round is one continuously batched pass (engine/packed_decoding.py)."""
    weights, _ = available_kinds()
    items = draw_items(rng, settings.batch_size, weights, TOPICS)
    temps = [rng.choice(settings.temperatures) for _ in items]
    before, after, between = _turn_pieces(tokenizer)
    stop = eos_ids_of(tokenizer, model.hf_model)
    room = model.max_len // settings.lanes - settings.max_new_tokens   # longest prompt a lane takes

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(prompts: list[list[int]], row_temps: list[float], max_new: int) -> list[Decoded]:
        return decode_packed(model, prompts, row_temps, max_new, stop, settings.top_k, gen, lanes=settings.lanes)

    selfq = [i for i, item in enumerate(items) if item.instruction]
    asked = run([before + encode(items[i].instruction) + after for i in selfq],
                [settings.instruction_temperature] * len(selfq), settings.instruction_max_tokens)
    questions = {i: [t for t in q.tokens if t not in stop] for i, q in zip(selfq, asked) if q.finished}
    rows: list[tuple[int, list[int], list[tuple[int, Decoded]]]] = []   # (item, prompt, teacher spans)
    for i, item in enumerate(items):
        if item.instruction:
            if len(questions.get(i, ())) > 3:
                rows.append((i, before + questions[i] + after, []))
        elif item.turns:
            rows.append((i, before + encode(item.turns[0]) + after, []))
        else:
            rows.append((i, encode(item.text), []))
    rows = [(i, prompt, spans) for i, prompt, spans in rows if len(prompt) <= room]
    answers = run([prompt for _, prompt, _ in rows], [temps[i] for i, _, _ in rows], settings.max_new_tokens)
    rows = [(i, prompt + ans.tokens, spans + [(len(prompt), ans)], ans.finished)
            for (i, prompt, spans), ans in zip(rows, answers)]
    for turn in range(1, max((len(item.turns) for item in items), default=1)):  # next turns after answers
        todo = [r for r, (i, _, _, finished) in enumerate(rows) if finished and len(items[i].turns) > turn]
        prompts = [rows[r][1] + between + encode(items[rows[r][0]].turns[turn]) + after for r in todo]
        keep = [(r, p) for r, p in zip(todo, prompts) if len(p) <= room]
        follow = run([p for _, p in keep], [temps[rows[r][0]] for r, _ in keep], settings.max_new_tokens)
        for (r, prompt), ans in zip(keep, follow):
            i, _, spans, _ = rows[r]
            rows[r] = (i, prompt + ans.tokens, spans + [(len(prompt), ans)], ans.finished)
    shard = _stack_rows([_row_arrays(tokens, spans, settings.top_k) for _, tokens, spans, _ in rows],
                        [temps[i] for i, *_ in rows])
    shard["kinds"] = np.array([items[i].kind for i, *_ in rows], dtype="<U16")
    return shard


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"{SHARD_PREFIX}{index:05d}.npz"


def _save_shard(path: Path, shard: dict[str, np.ndarray]) -> None:
    """Atomic write: a killed worker never leaves a half shard that a rerun would trust."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **shard)
    os.replace(tmp, path)
    meta = {"rows": int(len(shard["offsets"]) - 1), "tokens": int(len(shard["tokens"])),
            "teacher_tokens": int(shard["teacher"].sum())}
    if "kinds" in shard:
        meta["kinds"] = kind_counts(shard)
    path.with_suffix(".json").write_text(json.dumps(meta))


def kind_counts(shard: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """{kind: {rows, tokens, teacher_tokens}} of a shard that records its rows' kinds."""
    out: dict[str, dict[str, int]] = {}
    for r, kind in enumerate(shard["kinds"].tolist()):
        a, b = int(shard["offsets"][r]), int(shard["offsets"][r + 1])
        entry = out.setdefault(kind, {"rows": 0, "tokens": 0, "teacher_tokens": 0})
        entry["rows"] += 1
        entry["tokens"] += b - a
        entry["teacher_tokens"] += int(shard["teacher"][a:b].sum())
    return out


def write_mix(folder: Path, paths: list[Path]) -> dict:
    """mix.json: what the cache holds by kind (summed over its shards) and the kinds whose source is missing."""
    total: dict[str, dict[str, int]] = {}
    for path in paths:
        for kind, entry in json.loads(path.with_suffix(".json").read_text()).get("kinds", {}).items():
            into = total.setdefault(kind, {"rows": 0, "tokens": 0, "teacher_tokens": 0})
            for key, value in entry.items():
                into[key] += value
    mix = {"kinds": dict(sorted(total.items())), "missing_sources": available_kinds()[1]}
    (folder / "mix.json").write_text(json.dumps(mix, indent=1))
    return mix


def _shard_teacher_tokens(path: Path) -> int:
    return int(json.loads(path.with_suffix(".json").read_text())["teacher_tokens"])


def _worker(settings: DistillSettings, indices: list[int], threads: int, log_path: str | None,
            on_shard=None) -> None:
    """Generate the given shards in this process (one per CPU core when run in parallel); `on_shard()` after each."""
    from utils.models import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(settings.target)
    model = _load_generator(settings)
    folder = settings.folder()
    for index in indices:
        path = _shard_path(folder, index)
        if path.is_file():
            continue
        t0 = time.time()
        shard = generate_shard(model, tokenizer, settings, index)
        _save_shard(path, shard)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"shard": index, "teacher_tokens": int(shard["teacher"].sum()),
                                    "seconds": round(time.time() - t0, 1), "time": time.time()}) + "\n")
        if on_shard is not None:
            on_shard()


GQA_ATTENTION = "treespec_gqa"


def gqa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention for decoding from a static cache on CPU.

    transformers' eager path copies every key/value head once per query head (repeat_kv) over the whole
    preallocated cache each step, and its SDPA path is slow for one-token queries on CPU; this groups the
    query heads of each key/value head instead, and skips the cache slots that no row has filled yet.
    """
    q_len = query.shape[2]
    kv = key.shape[1]
    length = key.shape[2]
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        filled = mask[:, 0, -1, :].any(0).nonzero()
        length = int(filled.max()) + 1 if len(filled) else length
        additive = torch.zeros(mask.shape[0], 1, 1, q_len, length, dtype=query.dtype)
        additive.masked_fill_(~mask[:, :, None, :, :length], torch.finfo(query.dtype).min)
    k, v = key[:, :, :length], value[:, :, :length]
    # query head (kv g) reads key/value head kv: each key/value head's g query heads go through one matmul
    grouped = rearrange(query, "b (kv g) n d -> b kv (g n) d", kv=kv)
    scores = rearrange((grouped @ k.transpose(-1, -2)) * scaling, "b kv (g n) l -> b kv g n l", n=q_len)
    if attention_mask is not None:
        scores = scores + additive
    probs = rearrange(torch.softmax(scores.float(), -1).to(query.dtype), "b kv g n l -> b kv (g n) l")
    out = rearrange(probs @ v, "b kv (g n) d -> b n (kv g) d", n=q_len).contiguous()
    return out, None


def register_gqa_attention() -> None:
    """Make `attn_implementation=GQA_ATTENTION` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, eager_mask)  # always a full mask, never "causal, no mask"


# cache slots per lane of the packed generator: the longest prompt plus the answer (longer prompts are skipped)
LANE_SLOTS = 1024


def _load_generator(settings: DistillSettings):
    """The target in the generation dtype: with `gqa_attention` (see there why) for the "hf" generator, or as
    the suite's TreeModel on `linear_path` with LANE_SLOTS cache slots per lane for the "packed" one."""
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}.get(settings.dtype)
    if dtype is None:
        raise UserError(f"unknown distillation dtype {settings.dtype!r}: use bfloat16, float16 or float32")
    if (settings.text_style == "users") != (settings.generator == "packed"):
        raise UserError(f"distillation text_style {settings.text_style!r} with generator {settings.generator!r}: "
                        "the users mix runs on the packed generator, the other mixes on hf")
    if settings.generator == "packed":
        plan = KernelPlan(dtype, settings.linear_path)
        return load_pair(settings.target, None, False, dtype, "cpu", settings.lanes * LANE_SLOTS,
                         plans=(plan, plan)).target
    register_gqa_attention()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(settings.target), dtype=dtype,
                                                 attn_implementation=GQA_ATTENTION)
    return model.eval()


def ensure_distill_data(settings: DistillSettings, teacher_tokens: int, workers: int = 1,
                        log_path: str | None = None) -> list[Path]:
    """Shards holding at least `teacher_tokens` target-written tokens, generating the missing ones.

    Existing shards are counted first; new ones are split round-robin over `workers` processes, each with
    an equal share of the CPU threads.
    """
    if teacher_tokens <= 0:
        raise UserError("--distill-tokens must be positive")
    folder = settings.folder()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    have, index = 0, 0
    while _shard_path(folder, index).is_file() and have < teacher_tokens:
        have += _shard_teacher_tokens(_shard_path(folder, index))
        index += 1
    if have < teacher_tokens:
        if index:
            missing = list(range(index, index + math.ceil((teacher_tokens - have) / max(have / index, 1.0) * 1.05)))
        else:  # no shard yet to estimate tokens per shard from: one round of `workers` shards, then re-estimate
            missing = list(range(workers))
        _run_workers(settings, missing, workers, log_path)
        return ensure_distill_data(settings, teacher_tokens, workers, log_path)
    paths = [_shard_path(folder, i) for i in range(index)]
    if settings.text_style == "users":
        write_mix(folder, paths)
    return paths


def cached_teacher_tokens(settings: DistillSettings) -> int:
    """Target-written tokens already generated for `settings` (contiguous shards from 0), without generating."""
    have, index = 0, 0
    while _shard_path(settings.folder(), index).is_file():
        have += _shard_teacher_tokens(_shard_path(settings.folder(), index))
        index += 1
    return have


def _run_workers(settings: DistillSettings, indices: list[int], workers: int, log_path: str | None) -> None:
    from tqdm import tqdm

    threads = max(1, torch.get_num_threads() // max(workers, 1))
    bar = tqdm(total=len(indices), desc="target writes training text", unit="shard", dynamic_ncols=True)
    if workers <= 1:
        _worker(settings, indices, threads, log_path, on_shard=lambda: bar.update(1))
        bar.close()
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(settings, indices[w::workers], threads, log_path))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        while p.is_alive():  # the workers write shard files; the bar counts them
            p.join(timeout=5)
            bar.update(sum(_shard_path(settings.folder(), i).is_file() for i in indices) - bar.n)
    bar.close()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise UserError(f"a distillation worker failed (exit codes {failed}); rerun to resume from the saved shards")


def load_distill_data(paths: list[Path]) -> DistillData:
    """All given shards as one `DistillData` (row offsets shifted shard by shard)."""
    if not paths:
        raise UserError("no distillation shards to load")
    parts = [dict(np.load(p)) for p in paths]
    for part in parts:  # shards written before rows recorded their kind
        part.setdefault("kinds", np.full(len(part["offsets"]) - 1, "", dtype="<U16"))
    offsets, shift = [np.zeros(1, dtype=np.int64)], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + shift)
        shift += int(part["offsets"][-1])
    return DistillData(np.concatenate([p["tokens"] for p in parts]), np.concatenate(offsets),
                       np.concatenate([p["teacher"] for p in parts]), np.concatenate([p["topk_ids"] for p in parts]),
                       np.concatenate([p["topk_logprobs"] for p in parts]),
                       np.concatenate([p["greedy"] for p in parts]), np.concatenate([p["kinds"] for p in parts]))


def main(argv: list[str] | None = None) -> None:
    """Generate (or top up) the cache on its own: `python -m utils.training.distill_data TOKENS [WORKERS] [MIX]`."""
    from utils.cli import OneLineParser, run_cli

    parser = OneLineParser(prog="python -m utils.training.distill_data",
                           description="Generate (or top up) the cached distillation data that "
                                       "`pretrain_draft_model.py --distill` trains on.")
    parser.add_argument("tokens", type=int, help="target-written tokens the cache should hold")
    parser.add_argument("workers", type=int, nargs="?", default=1, help="generating processes")
    parser.add_argument("mix", nargs="?", default="chat", choices=sorted(DISTILL_MIXES),
                        help="chat (the defaults), articles (mostly text from ARTICLE_SEEDS) or users (openings and "
                             "questions of the kinds in utils/training/user_sources.py)")
    args = parser.parse_args(argv)

    def run() -> None:
        settings = DISTILL_MIXES[args.mix]
        print(settings.folder(), flush=True)
        paths = ensure_distill_data(settings, args.tokens, args.workers,
                                    log_path=str(settings.folder() / "progress.jsonl"))
        print(f"{len(paths)} shards, {sum(_shard_teacher_tokens(p) for p in paths)} teacher tokens", flush=True)

    run_cli(run)


if __name__ == "__main__":
    main()
