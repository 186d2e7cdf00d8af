"""How many tokens a micro-batch holds: from the shards' length statistics, a configured mean, or the worst case.

A micro-batch is ``train.micro_batch_size`` samples. What the LLM runs on is the
collator's rows (mmdist/data/collate.py): padded to the longest sample, or, with
``data.packing``, several samples per row of at most ``data.max_len`` tokens. The
planner sizes time and memory from one of three sources, best first, and says which:

1. **Shard statistics** (``stats.json`` beside the shards, mmdist/data/shard_stats.py):
   micro-batches are drawn from them (a fixed seed) and laid out by the collator's own
   :func:`~mmdist.data.collate.pack_rows`. Time uses the mean positions (rows x width)
   and real tokens; memory the 99th percentile of positions and tower images. A
   sample's LLM tokens are its text tokens, its template tokens and its images'
   positions (tiles and separators with ``data.image_tiling``, from the recorded image
   sizes). Text tokens are the recorded ones when the shards were written with the
   run's tokenizer; else characters x this data's tokens per character, measured by
   the run's tokenizer (when it is on this machine) on the text the stats keep, else
   :data:`DEFAULT_CHARS_PER_TOKEN`. Template tokens are measured by rendering with the
   run's template (mmdist.data.preprocess), else :data:`DEFAULT_CHAT_TOKENS_PER_MESSAGE`.
   Supervised tokens (those the loss is taken on, where the LM head runs) are the
   answers' share of a sample's text plus the template tokens labelled with each
   answer (its EOS or end-of-turn); shards whose statistics do not record answers
   count every text token as supervised, an upper bound.
2. **A configured mean** (``data.mean_tokens_per_sample``): packed, ``ceil(B x mean /
   max_len)`` rows, which memory counts as full ``max_len`` rows (a mean cannot bound
   a batch's longest row); padded, the rows stay at ``max_len`` for memory.
3. **The worst case**: every sample a full ``max_len`` row holding the costliest image.

The configured mean and the worst case count every text token as supervised.

Samples longer than ``max_len`` are counted at ``max_len`` (the preprocessor truncates).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from collections.abc import Sequence
from typing import Any, Optional

from mmdist.config.run import RunConfig
from mmdist.data.collate import pack_rows
from mmdist.data.shard_stats import QUANTILES, read_shard_stats
from mmdist.data.tiling import select_grid
from mmdist.plan.backbones import ModuleShape

log = logging.getLogger(__name__)

__all__ = ["BatchTokens", "DEFAULT_CHARS_PER_TOKEN", "DEFAULT_CHAT_TOKENS_PER_MESSAGE", "TextTokens", "batch_tokens",
           "planner_tokenizer", "text_tokens", "worst_case"]

DEFAULT_CHARS_PER_TOKEN = 4.0  # a default, not a measurement of your data: English prose in a BPE vocabulary
DEFAULT_CHAT_TOKENS_PER_MESSAGE = 5  # a default: ChatML's "<|im_start|>role\n ... <|im_end|>\n" around each message
DEFAULT_CHAT_ANSWER_TOKENS = 2  # a default: ChatML's "<|im_end|>\n" after an answer, labelled with it
DRAWS = (64, 400, 6400)  # simulated micro-batches per plan: at least, at most, and about this many samples in all
PEAK_QUANTILE = 0.99  # memory is sized for the micro-batch that 99% of the simulated ones stay under


@dataclasses.dataclass(frozen=True)
class BatchTokens:
    """One micro-batch as the planner counts it (means are per micro-batch; peaks size memory)."""

    samples: int
    tokens: float  # real tokens (text, template and image positions), padding excluded
    image_tokens: float  # LLM tokens that carry image features (tiles included, separators not)
    tower_images: float  # vision-tower forwards: images, plus their tiles when tiled
    positions: float  # positions the LLM runs on: rows x the widest row (padding included)
    rows: float
    peak_positions: int
    peak_tower_images: int
    row_len: int  # the widest row it can be (eager attention's scores grow with its square)
    source: str  # "shard statistics", "configured mean" or "worst case"
    note: str  # the sentence the plan prints about where the figures come from
    supervised: float = -1.0  # tokens the loss is taken on (-1: not known, every text token)
    peak_supervised: int = -1  # the same at the memory quantile

    @property
    def supervised_tokens(self) -> float:
        """Mean supervised tokens per micro-batch; every text token where they are not known (an upper bound)."""
        return self.supervised if self.supervised >= 0 else max(0.0, self.tokens - self.image_tokens)

    @property
    def peak_supervised_tokens(self) -> int:
        """Supervised tokens at the memory quantile; every text position at the peak where they are not known."""
        if self.peak_supervised >= 0:
            return self.peak_supervised
        return max(0, int(self.peak_positions - self.image_tokens * self.peak_positions / max(1.0, self.positions)))

    @property
    def per_sample_tokens(self) -> float:
        return self.tokens / max(1, self.samples)


@dataclasses.dataclass(frozen=True)
class TextTokens:
    """How the planner turns the stats' text into LLM tokens: per character (or recorded tokens), plus the template."""

    per_char: float  # LLM tokens per character of text (1.0 when the stats hold tokens of the run's tokenizer)
    units: str  # "chars" or "tokens": which of the stats' summaries is read
    per_message: float  # template tokens around each message of a conversation
    conversation_fixed: float  # template tokens once per conversation (a default system prompt, ...)
    caption_fixed: float  # template tokens of a caption sample (its prompt included), the caption's own not counted
    note: str
    per_answer: float = 1.0  # template tokens labelled with each assistant turn (its EOS, or end-of-turn mark)


def _image_dims(shapes: Sequence[ModuleShape]) -> tuple[int, int, int]:
    """(LLM tokens per tower image, tower images per sample at the costliest grid, positions per sample's image)."""
    by_name = {s.name: s for s in shapes}
    proj = by_name["projector"].dims
    tokens = int(proj["tokens_per_image"])
    return tokens, int(proj.get("images", 1)), int(proj.get("positions", tokens))


def worst_case(cfg: RunConfig, shapes: Sequence[ModuleShape], why: str = "") -> BatchTokens:
    """Every sample a full ``max_len`` row holding one image at the costliest tiling grid (the plan's upper bound)."""
    b, length = cfg.train.micro_batch_size, cfg.data.max_len
    images = image_tokens = 1
    if any(s.name == "projector" for s in shapes):
        tpi, images, _ = _image_dims(shapes)
        image_tokens = tpi * images
    note = f"worst case: every sample counted as a full row of data.max_len={length} tokens"
    note += f" ({why})" if why else ""
    return BatchTokens(b, float(b * length), float(b * image_tokens), float(b * images), float(b * length), float(b),
                       b * length, b * images, length, "worst case", note)


def from_mean(cfg: RunConfig, shapes: Sequence[ModuleShape], mean: int, why: str = "") -> BatchTokens:
    """``data.mean_tokens_per_sample``: packed rows filled to the mean; memory counts the rows as full."""
    b, length = cfg.train.micro_batch_size, cfg.data.max_len
    mean = min(mean, length)
    tpi, images, positions = _image_dims(shapes)
    image_tokens = tpi * images * min(1.0, mean / max(1, positions))  # one image per sample, as far as the mean allows
    if cfg.data.packing:
        rows = max(1, math.ceil(b * mean / length))
        positions_mean, peak = float(b * mean), rows * length
        how = f"packed into {rows} row(s) of up to {length}, counted full for memory"
    else:
        rows, positions_mean, peak = b, float(b * length), b * length
        how = f"padded rows counted at data.max_len={length} (a mean cannot bound the longest)"
    note = (f"configured mean: data.mean_tokens_per_sample={mean} tokens per sample ({b * mean:,} per micro-batch, "
            f"{how})" + (f"; {why}" if why else ""))
    return BatchTokens(b, float(b * mean), float(b * image_tokens), float(b * images), positions_mean, float(rows),
                       peak, b * images, length, "configured mean", note)


# ----------------------------------------------------------------------------------------------- text tokens


_LAST_TOKENIZER: dict[str, tuple[Any, str]] = {}  # the last LLM setting's tokenizer: a plan asks once per micro-batch


def planner_tokenizer(cfg: RunConfig) -> tuple[Any, str]:
    """(the LLM's tokenizer if it can be read on this machine without the network, else None; its name). The last
    one loaded is kept for the same ``model.llm`` settings: the plan reads it for every candidate micro-batch."""
    key = repr(cfg.model.llm)
    if key not in _LAST_TOKENIZER:
        _LAST_TOKENIZER.clear()
        _LAST_TOKENIZER[key] = _load_planner_tokenizer(cfg)
    return _LAST_TOKENIZER[key]


def _load_planner_tokenizer(cfg: RunConfig) -> tuple[Any, str]:
    llm = cfg.model.llm
    name = llm.tokenizer or llm.name_or_path
    if not name:
        return None, ""
    try:
        from mmdist.models.tokenizers import builtin_tokenizer

        builtin = builtin_tokenizer(name)
        if builtin is not None:
            return builtin, name
        from mmdist.models.llm import load_tokenizer, resolve_source

        source, gguf = resolve_source(llm) if not llm.tokenizer else (llm.tokenizer, None)
        if gguf or _is_local(source):
            return load_tokenizer(llm), name
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=llm.trust_remote_code)
        return tok, name
    except Exception:  # not on this machine (the hub is not asked): the planner's defaults apply
        return None, name


def _is_local(source: str) -> bool:
    import os

    return os.path.isdir(source) or os.path.isfile(source)


def _template_tokens(cfg: RunConfig, tokenizer: Any) -> tuple[float, float, float, float, str]:
    """(per message, per conversation, per caption sample, labelled per answer) template tokens, rendered as the
    preprocessor renders."""
    from types import SimpleNamespace

    from mmdist.data.preprocess import IGNORE_INDEX, Preprocessor, resolve_template

    processors = SimpleNamespace(tokenizer=tokenizer, image_token_id=-1, num_image_tokens=0, template="auto",
                                 image_transform=None)
    template = resolve_template(cfg.data.template, processors)
    pre = Preprocessor(processors, cfg.stage, template, max_len=1 << 30, caption_prompt=cfg.data.caption_prompt)
    render = pre._render_chat if template == "chat" else pre._render_plain
    word = "x"
    content = len(pre._encode(word))
    pair = [{"role": "user", "content": word}, {"role": "assistant", "content": word}]
    (ids, labels, _), two = render(pair), len(render(pair + pair)[0]) - 4 * content
    one = len(ids) - 2 * content
    per_message = (two - one) / 2
    per_answer = sum(t != IGNORE_INDEX for t in labels) - content
    caption = [{"role": "user", "content": cfg.data.caption_prompt}, {"role": "assistant", "content": word}]
    return per_message, one - 2 * per_message, len(render(caption)[0]) - content, per_answer, template


def text_tokens(cfg: RunConfig, entries: Sequence[dict]) -> TextTokens:
    """The conversion of the stats' text into LLM tokens for ``cfg`` (see the module's docstring)."""
    tokenizer, name = planner_tokenizer(cfg)
    recorded = bool(entries) and all(e.get("tokenizer") == name for e in entries) and bool(name)
    if recorded:
        per_char, units, how = 1.0, "tokens", f"text tokens recorded by the shard writer with {name}"
    elif tokenizer is not None:
        pieces = [p for e in entries[:16] for p in e.get("text_sample", [])]
        chars = sum(len(p) for p in pieces)
        tokens = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in pieces)
        per_char = tokens / chars if chars else 1 / DEFAULT_CHARS_PER_TOKEN
        units, how = "chars", f"{1 / per_char:.2f} characters per token, measured with {name} on the shards' text"
    else:
        per_char, units = 1 / DEFAULT_CHARS_PER_TOKEN, "chars"
        how = (f"{DEFAULT_CHARS_PER_TOKEN:g} characters per token (a default: {name or 'the tokenizer'} is not on this "
               "machine; `mmdist shard --tokenizer` records tokens)")
    measured = None
    if tokenizer is not None:
        try:
            measured = _template_tokens(cfg, tokenizer)
        except ValueError:  # data.template=chat with a tokenizer that has none: the trainer refuses it too
            measured = None
    if measured is not None:
        per_message, conversation, caption, per_answer, template = measured
        how += f"; {template} template: {per_message:g} tokens per message, measured"
    elif cfg.data.template == "plain":
        prompt = len(cfg.data.caption_prompt) * per_char
        per_message, conversation, caption = 1.0, 0.0, 1.0 + (prompt + 1 if prompt else 0.0)  # "\n" after a prompt, EOS
        per_answer = 1.0  # the EOS after each answer
        how += "; plain template: 1 token per message"
    else:
        per_message, conversation = float(DEFAULT_CHAT_TOKENS_PER_MESSAGE), 0.0
        caption = 2 * per_message + len(cfg.data.caption_prompt) * per_char
        per_answer = float(DEFAULT_CHAT_ANSWER_TOKENS)
        how += f"; chat template: {DEFAULT_CHAT_TOKENS_PER_MESSAGE} tokens per message (a default, ChatML's)"
    return TextTokens(per_char, units, per_message, conversation, caption, how, per_answer)


# ----------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class _Component:
    """One shard's samples with one image count: a weight, a text-length distribution, its images' layouts."""

    weight: float
    images: int
    quantiles: list[float]  # LLM tokens of the text and template at QUANTILES
    shift: float  # so that the interpolated distribution keeps the recorded mean
    layouts: list[tuple[int, int, int]]  # per image size: (LLM positions, tower images, feature tokens)
    layout_weights: list[float]
    template: float = 0.0  # template tokens per sample (inside ``quantiles``)
    answer_share: float = 1.0  # the share of the text (template excluded) that is answers (1: not recorded)
    answer_fixed: float = 0.0  # template tokens labelled with the answers, per sample
    answers_recorded: bool = False  # whether the statistics count the answers apart (else every text token counts)
    turns: float = 1.0  # answers per sample

    def supervised(self, text: float, cut: float) -> float:
        """Supervised tokens of a sample whose text and template come to ``text`` tokens, of which truncation cuts the
        last ``cut``: a sample ends with an answer (the mean one, ``1 / turns`` of its answers), so the cut takes that
        first, and then, of the alternating questions and answers before it, the answers' share."""
        labelled = self.answer_share * max(0.0, text - self.template) + self.answer_fixed
        last = labelled / max(1.0, self.turns)
        earlier = (labelled - last) / max(1.0, text - last)
        return max(0.0, labelled - min(cut, last) - max(0.0, cut - last) * earlier)

    def text(self, u: float) -> float:
        x = u * (len(self.quantiles) - 1)
        lo = min(int(x), len(self.quantiles) - 2)
        return max(0.0, self.quantiles[lo] + (self.quantiles[lo + 1] - self.quantiles[lo]) * (x - lo) + self.shift)


def _layouts(cfg: RunConfig, shapes: Sequence[ModuleShape],
             sizes: dict) -> tuple[list[tuple[int, int, int]], list[float]]:
    tpi = _image_dims(shapes)[0]
    tiling = cfg.data.image_tiling
    if not tiling.enabled or not sizes:
        return [(tpi, 1, tpi)], [1.0]
    from mmdist.plan.images import separator_tokens

    sep = separator_tokens(cfg)[0]
    tile = int(next(s for s in shapes if s.name == "vision_encoder").dims["image_size"])
    out, weights = [], []
    for key, count in sizes.items():
        width, height = (int(v) for v in key.split("x"))
        rows, cols = select_grid((height, width), tiling, tile)
        tiles = rows * cols
        out.append(((1 + tiles) * tpi + rows * sep, 1 + tiles, (1 + tiles) * tpi))
        weights.append(float(count))
    return out, weights


def _components(cfg: RunConfig, shapes: Sequence[ModuleShape], sources: Sequence[tuple[float, list[dict]]],
                conv: TextTokens) -> list[_Component]:
    out = []
    trapezoid = [0.5 if i in (0, len(QUANTILES) - 1) else 1.0 for i in range(len(QUANTILES))]
    for source_weight, entries in sources:
        total = sum(e["samples"] for e in entries) or 1
        for entry in entries:
            layouts, layout_weights = _layouts(cfg, shapes, entry.get("image_sizes", {}))
            for count, group in entry["by_images"].items():
                q = group[f"{conv.units}_q"]
                mean = group[f"{conv.units}_mean"]
                captions = group.get("captions", 0) / max(1, group["samples"])
                template = (captions * conv.caption_fixed
                            + (1 - captions) * (conv.conversation_fixed + conv.per_message * group.get("messages", 2)))
                tokens = [v * conv.per_char + template for v in q]
                interpolated = sum(w * v for w, v in zip(trapezoid, tokens)) / sum(trapezoid)
                answers = group.get(f"answer_{conv.units}_mean")
                if answers is None:  # statistics written before answers were recorded: every text token
                    share, fixed = 1.0, template
                else:
                    share = min(1.0, answers / mean) if mean else 0.0
                    fixed = group.get("answers", 1.0) * conv.per_answer
                out.append(_Component(source_weight * group["samples"] / total, int(count), tokens,
                                      mean * conv.per_char + template - interpolated, layouts, layout_weights,
                                      template, share, fixed, answers is not None, group.get("answers", 1.0)))
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def from_stats(cfg: RunConfig, shapes: Sequence[ModuleShape], sources: Sequence[tuple[float, list[dict]]], note: str,
               draws: Optional[int] = None, seed: int = 0) -> BatchTokens:
    """Micro-batches drawn from the statistics and laid out by the collator (see the module's docstring)."""
    b, length, packing = cfg.train.micro_batch_size, cfg.data.max_len, cfg.data.packing
    conv = text_tokens(cfg, [e for _, entries in sources for e in entries])
    components = _components(cfg, shapes, sources, conv)
    weights = list(itertools.accumulate(c.weight for c in components))
    draws = draws or min(DRAWS[1], max(DRAWS[0], DRAWS[2] // max(1, b)))
    rng = random.Random(seed)
    real, image_tokens, tower, positions, rows_seen, supervised = [], [], [], [], [], []
    for _ in range(draws):
        lengths, feats, towers, labelled = [], 0, 0, 0.0
        for comp in rng.choices(components, cum_weights=weights, k=b):
            n = text = comp.text(rng.random())
            for layout in (rng.choices(comp.layouts, comp.layout_weights, k=comp.images) if comp.images else ()):
                n += layout[0]
                towers += layout[1]
                feats += layout[2]
            labelled += comp.supervised(text, max(0.0, n - length))
            lengths.append(min(length, max(1, int(round(n)))))
        rows = pack_rows(lengths, length) if packing else [[i] for i in range(b)]
        width = max(sum(lengths[i] for i in row) for row in rows)
        real.append(sum(lengths))
        image_tokens.append(feats)
        tower.append(towers)
        positions.append(len(rows) * width)
        rows_seen.append(len(rows))
        supervised.append(labelled)
    mean = sum(real) / draws
    peak = int(_percentile(positions, PEAK_QUANTILE))
    text = (f"shard statistics: {note}; {mean / b:,.0f} tokens per sample on average, {mean:,.0f} per micro-batch "
            f"({'packed' if packing else 'padded'} into {sum(rows_seen) / draws:.1f} row(s), "
            f"{sum(positions) / draws:,.0f} "
            f"positions; memory sized for {peak:,}, the {PEAK_QUANTILE:.0%} point); {conv.note}")
    if not all(c.answers_recorded for c in components):
        text += "; answers not recorded in these statistics: every text token counted as supervised (an upper bound)"
    return BatchTokens(b, mean, sum(image_tokens) / draws, sum(tower) / draws, sum(positions) / draws,
                       sum(rows_seen) / draws, peak, int(_percentile(tower, PEAK_QUANTILE)), length, "shard statistics",
                       text, sum(supervised) / draws, int(math.ceil(_percentile(supervised, PEAK_QUANTILE))))


def _source_stats(patterns: Sequence[Sequence[str]]) -> tuple[list[list[dict]], int, int, int]:
    """Per source: the stats entries of its shards; and how many shards in all, how many without statistics, how
    many of those not on this machine."""
    import os

    from mmdist.data.reader import _expand_pattern  # the reader's own pattern expansion (brace patterns, .txt lists)

    out, total, missing, absent = [], 0, 0, 0
    for source in patterns:
        urls = [u for p in source for u in _expand_pattern(p)]
        found = read_shard_stats(urls)
        total += len(urls)
        missing += sum(v is None for v in found.values())
        absent += sum(not os.path.isfile(u) for u, v in found.items() if v is None)
        out.append([v for v in found.values() if v is not None])
    return out, total, missing, absent


def batch_tokens(cfg: RunConfig, shapes: Sequence[ModuleShape], shards: Optional[Sequence[str]] = None) -> BatchTokens:
    """The micro-batch of ``cfg`` from the best source at hand: the statistics of ``shards`` (patterns; default the
    config's ``data.train`` sources), else ``data.mean_tokens_per_sample``, else the worst case."""
    if not any(s.name == "llm" for s in shapes):  # stage align: a caption of model.text.max_length per image
        return worst_case(cfg, shapes, "the stage-1 model reads one image and one caption per sample")
    if shards:
        patterns, weights, where = [list(shards)], [1.0], "--data"
    else:
        patterns = [list(s.shards) for s in cfg.data.train]
        weights = [s.weight if cfg.data.mode == "resampled" else 1.0 for s in cfg.data.train]
        where = "data.train"
    try:
        per_source, total, missing, absent = _source_stats(patterns)
        why = f"no shards in {where}"
    except (OSError, ValueError) as exc:
        per_source, total, missing, absent = [], 0, 0, 0
        why = f"the shards of {where} cannot be listed: {exc}"
    sources = [(w, entries) for w, entries in zip(weights, per_source) if entries]
    if sources:
        if not shards and cfg.data.mode != "resampled":  # epoch mode reads every sample once: weight by samples
            sources = [(1.0 * sum(e["samples"] for e in entries), entries) for _, entries in sources]
        counted = sum(len(entries) for _, entries in sources)
        note = f"stats.json of {counted} of the {total} shard(s) of {where}"
        if missing:
            note += f" ({missing} without statistics are taken to be alike)"
        try:
            return from_stats(cfg, shapes, sources, note)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a stats.json from another tool or version
            why = (f"the stats.json of {where} could not be read ({type(exc).__name__}: {exc}); "
                   "rewrite it with `mmdist shard`")
            log.warning("planning without shard statistics: %s", why)
            if cfg.data.mean_tokens_per_sample:
                return from_mean(cfg, shapes, cfg.data.mean_tokens_per_sample, why)
            return worst_case(cfg, shapes, why)
    if absent == total and total:
        why = f"the {total} shard(s) of {where} are not on this machine"
    elif total:
        why = (f"none of the {total} shard(s) of {where} has a stats.json entry "
               "(written before `mmdist shard` kept them?)")
    if cfg.data.mean_tokens_per_sample:
        return from_mean(cfg, shapes, cfg.data.mean_tokens_per_sample, why)
    return worst_case(cfg, shapes, why + "; set data.mean_tokens_per_sample, or pass shards with statistics")
