"""The decoding policy: banned phrases in the lake (versions, conflicts, reload without restart),
their enforcement on every tokenisation (byte level, Chinese split into partial UTF-8 pieces), the
不可能 exception, the tiny model never saying a banned word it would say, and the CLI."""

from __future__ import annotations

import pytest
import torch

from vloop.vlm.decoding import (BannedPhrases, PolicyCache, PolicyConflict, PolicyError, ban, contains_banned, current,
                                history, token_bytes, unban)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from vloop.vlm.model import processor_class

    return processor_class().from_pretrained(tiny_model_dir).tokenizer


def test_policy_versions_in_the_lake(local_lake):
    assert current(local_lake).version == 0 and current(local_lake).banned == ()
    p1 = ban(local_lake, ["可能", " maybe  ", "可能"], actor="ann", reason="deleted in 40% of edits")
    assert (p1.version, p1.banned) == (1, ("可能", "maybe"))
    assert ban(local_lake, ["maybe"], actor="ann", reason="again").version == 1  # nothing new: no version
    p2 = unban(local_lake, ["maybe"], actor="bob", reason="too broad")
    assert (p2.version, p2.banned, p2.actor) == (2, ("可能",), "bob")
    assert [p.version for p in history(local_lake)] == [1, 2]
    assert local_lake.get_json("config/decoding.json")["banned"] == ["可能"]  # the readable copy
    with pytest.raises(PolicyError, match="not banned: probably"):
        unban(local_lake, ["probably"], actor="bob", reason="x")
    with pytest.raises(PolicyError, match="empty"):
        ban(local_lake, ["  "], actor="bob", reason="x")
    # Two people changing it at once: the one who read the older head is refused, nothing lost.
    from vloop.vlm.decoding import _write

    stale = history(local_lake)[0]
    with pytest.raises(PolicyConflict, match="read it again"):
        _write(local_lake, stale, {"banned": ("大概",)}, actor="eve", reason="x")
    assert current(local_lake).banned == ("可能",)


def test_a_replica_picks_up_a_ban_without_restart(local_lake):
    cache = PolicyCache(local_lake, ttl_s=3600)
    assert cache.get().banned == ()
    ban(local_lake, ["大概"], actor="a", reason="r")
    assert cache.get().banned == ()  # within the TTL: the copy it holds
    cache.ttl_s = 0
    assert cache.get().banned == ("大概",)


def _scripted(tokenizer, target: str, proc=None, prefer_long=True, prompt_len=3):
    """Greedy decoding by a 'model' that wants to spell ``target`` (by the longest or the shortest
    tokens that continue it); when a token is masked it takes the best other one."""
    tb = token_bytes(tokenizer)
    goal, text, ids = target.encode(), b"", []
    for _ in range(4 * len(goal)):
        if not goal.startswith(text) or text == goal:
            break
        rest = goal[len(text):]
        scores = torch.full((1, len(tb)), -1e6)
        for i, b in enumerate(tb):
            if b and rest.startswith(b):
                scores[0, i] = len(b) if prefer_long else 100 - len(b)
            elif b:
                scores[0, i] = -i  # anything else, in a fixed order
        if proc is not None:
            scores = proc(torch.tensor([[0] * prompt_len + ids]), scores)
        i = int(scores[0].argmax())
        ids.append(i)
        text += tb[i]
    return text.decode("utf-8", errors="replace"), ids


@pytest.mark.parametrize("prefer_long", [True, False])
def test_banned_phrase_is_blocked_on_every_tokenisation(tokenizer, prefer_long):
    # Unbanned, the scripted model spells the target (the check that the script works) ...
    said, ids = _scripted(tokenizer, "可能是红色", prefer_long=prefer_long)
    assert said == "可能是红色"
    if not prefer_long:
        assert len(ids) >= 4  # byte pieces: 可能 spelled across partial UTF-8 tokens
    # ... banned, it cannot, by long tokens or byte by byte.
    proc = BannedPhrases(tokenizer, ["可能", "maybe"], prompt_len=3)
    for target in ("可能是红色", "这可能是红色", "maybe red", "Maybe red", "it is MAYBE red"):
        said, _ = _scripted(tokenizer, target, proc, prefer_long=prefer_long)
        assert not contains_banned(said, ["可能", "maybe"]), (target, said)
    # The prompt does not count: the answer starts after prompt_len.
    said, _ = _scripted(tokenizer, "红色", proc, prefer_long=prefer_long)
    assert said == "红色"


def test_the_longer_word_stays_allowed(tokenizer):
    proc = BannedPhrases(tokenizer, ["可能"], prompt_len=0)
    assert _scripted(tokenizer, "不可能", proc, prompt_len=0)[0] == "不可能"  # 不可能 is an exception
    assert "可能" not in _scripted(tokenizer, "不是可能", proc, prompt_len=0)[0]
    strict = BannedPhrases(tokenizer, ["可能"], exceptions=(), prompt_len=0)
    assert "可能" not in _scripted(tokenizer, "不可能", strict, prompt_len=0)[0]
    assert contains_banned("这不可能", ["可能"]) == [] and contains_banned("不可能,可能吧", ["可能"]) == ["可能"]


def test_the_model_never_says_a_banned_word_it_would_say(tiny_model_dir):
    from vloop.vlm.model import generate, load_model
    from vloop.sim.synth import World

    lm = load_model(tiny_model_dir)
    samples = World(5).samples(8)
    imgs, qs = [s.image for s in samples], [s.question for s in samples]
    free = [g.text for g in generate(lm, imgs, qs, max_new_tokens=12)]
    # Something the model does say: the commonest two-letter (or two-character) word piece.
    import re
    from collections import Counter

    pieces = Counter(m for t in free for m in re.findall(r"(?=([^\W\d_]{2}))", t))
    assert pieces, free
    word = pieces.most_common(1)[0][0]
    banned = [g.text for g in generate(lm, imgs, qs, max_new_tokens=12, bad_words=[word], exceptions=())]
    assert all(word not in t for t in banned), (word, banned)
    assert banned != free  # it said something else instead


def test_decoding_commands(tmp_path, capsys):
    from vloop.cli import main

    url = (tmp_path / "lake").as_uri()
    assert main(["decoding", "ban", "可能", "maybe", "--reason", "users delete them", "--url", url]) == 0
    assert main(["decoding", "unban", "maybe", "--reason", "too broad", "--url", url]) == 0
    capsys.readouterr()
    assert main(["decoding", "list", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "可能" in out and "maybe" not in out.split("exceptions")[0]
    assert main(["decoding", "unban", "nope", "--reason", "x", "--url", url]) == 2
    assert "not banned: nope" in capsys.readouterr().err
