"""Answer quality of a model (base, or base + adapter) on an evaluation set.

Metrics per example set, overall and per category and intent: exact match (after
:func:`vloop.vlm.model.normalise_answer`), token F1, BLEU (sacrebleu's sentence BLEU with effective
order, averaged — answers are a few words; its ``zh`` tokenizer so Chinese answers count) and ROUGE-L F1 (rouge-score, with a tokenizer that keeps CJK characters).
Per-item exact match (:func:`exact_matches`) is what the gate's paired test uses;
:func:`intent_of` tells a question's intent from its wording when rows carry none.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import pandas as pd

_TOKEN = re.compile(r"[\u3400-\u9fff]|[^\W_]+", re.UNICODE)  # a CJK character, or a run of letters/digits


def tokens(text: str) -> list[str]:
    return _TOKEN.findall((text or "").lower())


class _Tokenizer:  # the interface rouge_score expects
    def tokenize(self, text):
        return tokens(text)


def token_f1(pred: str, ref: str) -> float:
    p, r = tokens(pred), tokens(ref)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_matches(preds: Sequence[str], refs: Sequence[str]) -> list[int]:
    """Per item: 1 when the prediction equals the reference after
    :func:`vloop.vlm.model.normalise_answer`, else 0 (what ``exact_match`` averages)."""
    from vloop.vlm.model import normalise_answer

    return [int(normalise_answer(p) == normalise_answer(r)) for p, r in zip(preds, refs)]


# What a shopper asks about a product photo, by keywords (English and Chinese), first match wins:
# a colour question often contains "what is this" too, so colour and count come before category.
_INTENT_KEYWORDS = (
    ("colour", re.compile(r"\bcolou?rs?\b|颜色", re.I)),
    ("count", re.compile(r"\bhow many\b|\bcount\b|(几|多少)(个|件|双|只|顶|条|款)", re.I)),
    ("suitable", re.compile(r"\b(can|could) i\b|\bgood for\b|\bsuitable\b|\bfit for\b|适合|能|可以", re.I)),
    ("category", re.compile(r"\bwhat (is|are) (this|these|that|it)\b|\bwhat kind\b|\bwhat type\b|"
                            r"\bwhat am i looking at\b|是什么|什么(商品|东西)|是啥", re.I)),
)
INTENTS = tuple(name for name, _ in _INTENT_KEYWORDS) + ("other",)


def intent_of(question: str) -> str:
    """The intent of a shopper's question (colour, count, suitable, category, or "other"), from
    its wording, so datasets and evaluations can be broken down by intent when the rows do not
    carry one."""
    q = (question or "").strip()
    for name, pattern in _INTENT_KEYWORDS:
        if pattern.search(q):
            return name
    return "other"


def scores(preds: Sequence[str], refs: Sequence[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    n = len(refs)
    if not n:
        return {"n": 0, "exact_match": float("nan"), "token_f1": float("nan"), "bleu": float("nan"),
                "rouge_l": float("nan")}
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    # Answers are a few words: sentence BLEU with effective order (no zero for missing 4-grams).
    bleu = sacrebleu.metrics.BLEU(tokenize="zh", effective_order=True)
    return {
        "n": n,
        "exact_match": sum(exact_matches(preds, refs)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(preds, refs)) / n,
        "bleu": sum(bleu.sentence_score(p, [r]).score for p, r in zip(preds, refs)) / n / 100,
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / n,
    }


def sentence_bleu_rouge(preds: Sequence[str], refs: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per item, the sentence BLEU (0-1) and ROUGE-L F1 that :func:`scores` averages; each
    distinct (prediction, reference) pair is scored once (a day's edits repeat a lot)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    bleu = sacrebleu.metrics.BLEU(tokenize="zh", effective_order=True)
    memo: dict = {}
    for pair in zip(preds, refs):
        if pair not in memo:
            p, r = pair
            memo[pair] = (bleu.sentence_score(p, [r]).score / 100, scorer.score(r, p)["rougeL"].fmeasure)
    out = [memo[pair] for pair in zip(preds, refs)]
    return [b for b, _ in out], [r for _, r in out]


def breakdown(df: pd.DataFrame) -> dict:
    """``df``: prediction, answer, category, intent → overall and per-group scores."""
    out = {"overall": scores(df["prediction"].tolist(), df["answer"].tolist())}
    for col in ("category", "intent"):
        out[f"by_{col}"] = {str(k): scores(g["prediction"].tolist(), g["answer"].tolist())
                            for k, g in df.groupby(col, dropna=False)}
    return out


def predict(lm, lake, examples: pd.DataFrame, *, batch_size: int = 32, max_new_tokens: int = 16,
            log=print) -> list[str]:
    """Greedy answers of ``lm`` for the examples (images read from the lake)."""
    import time

    from vloop.vlm.model import generate

    out, t0 = [], time.perf_counter()
    for s in range(0, len(examples), batch_size):
        chunk = examples.iloc[s:s + batch_size]
        images = [lake.get_bytes(k) for k in chunk["image_key"]]
        out += [g.text for g in generate(lm, images, chunk["question"].tolist(), max_new_tokens=max_new_tokens)]
        el = time.perf_counter() - t0
        log(f"  evaluated {len(out)}/{len(examples)} ({len(out) / el:.0f}/s, "
            f"eta {(len(examples) - len(out)) * el / len(out):.0f}s)")
    return out
