"""A synthetic product-QA world that plays the app's users.

Product pictures are drawn with PIL (shoes, bags, dresses, shirts, hats; several colours; styles
such as running vs formal shoes; 1-3 items; random size, position and background), optionally
degraded (blur, low light, glare, heavy crop) and marked as such. Questions come from templates
with several paraphrases per intent, in English and Chinese, each with its ground-truth answer:

* ``colour``   — "What colour is this?" → "red" / "红色"
* ``category`` — "What is this?" → "shoes" / "鞋子"
* ``suitable`` — "Can I run in these?" (shoes), "Is this good for hiking?" (bags) → "yes" / "能"
* ``count``    — "How many are there?" → "2" / "2"

Everything is deterministic for a seed: ``World(seed).samples(n)`` gives the same list each time.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

CATEGORIES = ("shoes", "bags", "dresses", "shirts", "hats")
STYLES = {"shoes": ("running", "formal"), "bags": ("backpack", "handbag"), "dresses": ("dress",),
          "shirts": ("shirt",), "hats": ("cap",)}
COLOURS = {"red": (205, 35, 35), "blue": (35, 75, 210), "green": (35, 160, 70),
           "black": (25, 25, 25), "white": (245, 245, 245), "yellow": (235, 200, 30)}
COLOURS_ZH = {"red": "红色", "blue": "蓝色", "green": "绿色", "black": "黑色", "white": "白色", "yellow": "黄色"}
CATEGORIES_ZH = {"shoes": "鞋子", "bags": "包", "dresses": "裙子", "shirts": "衬衫", "hats": "帽子"}
INTENTS = ("colour", "category", "suitable", "count")
LANGS = ("en", "zh")
DEGRADATIONS = ("blur", "low_light", "glare", "crop")

# Paraphrases per (intent, language). {item} is the category noun where a template needs it.
QUESTIONS = {
    ("colour", "en"): ["What colour is this?", "What color are these?", "Which colour is it?",
                       "Tell me the colour of this item."],
    ("colour", "zh"): ["这是什么颜色?", "这个是什么颜色的?", "它是什么颜色?", "请问这是啥颜色?"],
    ("category", "en"): ["What is this?", "What kind of product is this?", "What am I looking at?"],
    ("category", "zh"): ["这是什么?", "这是什么商品?", "图里是什么东西?"],
    ("count", "en"): ["How many are there?", "How many items do you see?", "Count the items."],
    ("count", "zh"): ["有几个?", "图里有几件?", "一共有多少个?"],
}
SUITABLE_QUESTIONS = {  # category -> language -> paraphrases; the style that makes it "yes"
    "shoes": ("running", {"en": ["Can I run in these?", "Are these good for running?",
                                 "Can I go jogging in these shoes?"],
                          "zh": ["这双鞋能跑步吗?", "穿这双鞋可以跑步吗?", "这鞋适合跑步吗?"]}),
    "bags": ("backpack", {"en": ["Is this good for hiking?", "Can I take this bag hiking?"],
                          "zh": ["这个包适合徒步吗?", "背这个包能去爬山吗?"]}),
}
YES_NO = {"en": ("yes", "no"), "zh": ("能", "不能")}


@dataclass
class Sample:
    """One user question about one product picture, with the ground truth."""
    id: str
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    intent: str
    lang: str
    category: str
    colour: str
    style: str
    count: int
    degradation: str | None = None

    def image_bytes(self, fmt: str = "PNG") -> bytes:
        out = io.BytesIO()
        self.image.save(out, format=fmt)
        return out.getvalue()


def _draw_item(d: ImageDraw.ImageDraw, category: str, style: str, box: tuple[int, int, int], rgb) -> None:
    """Draw one product inside the square (x, y, size)."""
    x, y, s = box
    outline = (90, 90, 90) if sum(rgb) > 600 else None  # white items need an edge to be seen
    u = s / 10

    def P(px, py):
        return (x + px * u, y + py * u)

    if category == "shoes" and style == "running":
        d.polygon([P(0, 7), P(10, 7), P(10, 5), P(6, 4), P(3, 2), P(0, 3)], fill=rgb, outline=outline)
        d.rectangle([P(0, 7), P(10, 8.5)], fill=(235, 235, 235), outline=(120, 120, 120))  # thick sole
    elif category == "shoes":  # formal: low, pointed, heel
        d.polygon([P(0, 6), P(10, 7), P(9, 5.5), P(3, 4.5), P(0, 4.5)], fill=rgb, outline=outline)
        d.rectangle([P(0, 6), P(1.5, 8)], fill=(60, 40, 20))
    elif category == "bags" and style == "backpack":
        d.rounded_rectangle([P(2, 1), P(8, 9.5)], radius=u * 1.5, fill=rgb, outline=outline)
        d.rectangle([P(3, 5.5), P(7, 8.5)], outline=(90, 90, 90), width=max(1, int(u / 3)))
    elif category == "bags":  # handbag: wide body, arched handle
        d.rectangle([P(1, 4), P(9, 9)], fill=rgb, outline=outline)
        d.arc([P(3, 1), P(7, 6)], 180, 360, fill=rgb if outline is None else outline, width=max(1, int(u)))
    elif category == "dresses":
        d.polygon([P(4, 0.5), P(6, 0.5), P(6.5, 4), P(9, 9.5), P(1, 9.5), P(3.5, 4)], fill=rgb, outline=outline)
    elif category == "shirts":
        d.polygon([P(3, 1), P(7, 1), P(10, 3), P(9, 4.5), P(7.5, 3.5), P(7.5, 9.5), P(2.5, 9.5),
                   P(2.5, 3.5), P(1, 4.5), P(0, 3)], fill=rgb, outline=outline)
    else:  # hats: cap with a brim
        d.chord([P(2, 2), P(8, 9)], 180, 360, fill=rgb, outline=outline)
        d.rectangle([P(1, 5.5), P(10, 6.5)], fill=rgb, outline=outline)


def render(category: str, style: str, colour: str, count: int, rng: random.Random,
           size: int | None = None) -> Image.Image:
    """A product photo: ``count`` items on a plain light background at a random size and spot."""
    size = size or rng.choice((96, 128, 160, 224))
    bg = tuple(rng.randint(150, 225) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cell = size // count if count > 1 else size
    item = int(cell * rng.uniform(0.6, 0.85)) if count > 1 else int(size * rng.uniform(0.55, 0.85))
    for i in range(count):
        if count > 1:  # side by side, each in its own column
            x0 = i * cell + rng.randint(0, max(0, cell - item))
            y0 = rng.randint(0, size - item)
        else:
            x0, y0 = rng.randint(0, size - item), rng.randint(0, size - item)
        _draw_item(d, category, style, (x0, y0, item), COLOURS[colour])
    return img


def degrade(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """The kinds of bad photo users send."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=img.width / rng.uniform(12, 20)))
    if kind == "low_light":
        return ImageEnhance.Brightness(img).enhance(rng.uniform(0.12, 0.25))
    if kind == "glare":
        out = img.copy()
        d = ImageDraw.Draw(out)
        w = img.width
        cx, cy = rng.randint(w // 4, 3 * w // 4), rng.randint(w // 4, 3 * w // 4)
        r = int(w * rng.uniform(0.25, 0.4))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 250))
        return out
    if kind == "crop":
        w = img.width
        c = int(w * rng.uniform(0.3, 0.45))
        x, y = rng.randint(0, w - c), rng.randint(0, w - c)
        return img.crop((x, y, x + c, y + c)).resize((w, w))
    raise ValueError(f"unknown degradation {kind!r}; use one of {DEGRADATIONS}")


def answer_for(intent: str, lang: str, category: str, style: str, colour: str, count: int) -> str:
    if intent == "colour":
        return colour if lang == "en" else COLOURS_ZH[colour]
    if intent == "category":
        return category if lang == "en" else CATEGORIES_ZH[category]
    if intent == "count":
        return str(count)
    if intent == "suitable":
        good_style, _ = SUITABLE_QUESTIONS[category]
        yes, no = YES_NO[lang]
        return yes if style == good_style else no
    raise ValueError(f"unknown intent {intent!r}; use one of {INTENTS}")


def intents_for(category: str) -> tuple[str, ...]:
    return tuple(i for i in INTENTS if i != "suitable" or category in SUITABLE_QUESTIONS)


class World:
    """A seeded generator of samples. Filters restrict what is drawn (e.g. a partial slice)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def sample(self, index: int, *, categories=CATEGORIES, intents=INTENTS, langs=LANGS,
               colours=tuple(COLOURS), degraded: float = 0.0, max_count: int = 3) -> Sample:
        """The ``index``-th sample of this world and filter: the same arguments give the same sample."""
        key = f"{self.seed}|{index}|{categories}|{intents}|{langs}|{colours}|{degraded}|{max_count}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        while True:  # draw a category that has one of the wanted intents
            category = rng.choice(list(categories))
            possible = [i for i in intents_for(category) if i in intents]
            if possible:
                break
        intent = rng.choice(possible)
        lang = rng.choice(list(langs))
        style = rng.choice(STYLES[category])
        colour = rng.choice(list(colours))
        count = rng.randint(1, max_count) if intent == "count" else rng.choice((1, 1, 1, 2))
        if intent == "suitable":
            question = rng.choice(SUITABLE_QUESTIONS[category][1][lang])
        else:
            question = rng.choice(QUESTIONS[(intent, lang)])
        img = render(category, style, colour, count, rng)
        degradation = None
        if degraded and rng.random() < degraded:
            degradation = rng.choice(DEGRADATIONS)
            img = degrade(img, degradation, rng)
        sid = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Sample(sid, img, question, answer_for(intent, lang, category, style, colour, count),
                      intent, lang, category, colour, style, count, degradation)

    def samples(self, n: int, start: int = 0, **filters) -> list[Sample]:
        return [self.sample(i, **filters) for i in range(start, start + n)]


GOLDEN_SEED = 424242  # the synthetic world the simulation's golden set is drawn from


def golden_samples(size: int = 200) -> list[Sample]:
    """The simulation's golden evaluation set (what :func:`vloop.learn.dataset.ensure_golden` writes
    when a simulation passes it): ``size`` samples of the world ``GOLDEN_SEED``, all intents."""
    return World(GOLDEN_SEED).samples(size)


def corpus(world: World | None = None) -> list[str]:
    """Every question and answer string the world can produce (to train the tiny tokenizer)."""
    texts = []
    for qs in QUESTIONS.values():
        texts += qs
    for _, by_lang in SUITABLE_QUESTIONS.values():
        for qs in by_lang.values():
            texts += qs
    texts += list(COLOURS) + list(COLOURS_ZH.values()) + list(CATEGORIES) + list(CATEGORIES_ZH.values())
    texts += [w for pair in YES_NO.values() for w in pair] + [str(i) for i in range(10)]
    return texts


def intent_of(question: str) -> str:
    """The intent of a question the synthetic world asks ("other" for anything else), so
    datasets and evaluations can be broken down by intent."""
    if not _INTENT_BY_QUESTION:
        for (intent, _), qs in QUESTIONS.items():
            _INTENT_BY_QUESTION.update({q: intent for q in qs})
        for _, (_, by_lang) in SUITABLE_QUESTIONS.items():
            _INTENT_BY_QUESTION.update({q: "suitable" for qs in by_lang.values() for q in qs})
    return _INTENT_BY_QUESTION.get((question or "").strip(), "other")


_INTENT_BY_QUESTION: dict[str, str] = {}


def textured_scene(seed: int, size: int = 256) -> Image.Image:
    """A procedurally generated photo-like scene with natural image statistics, for fitting and
    testing NIQE (:func:`vloop.curate.imagequality.niqe`) without downloading photos.

    A dead-leaves image — overlapping ellipses with sizes from a power law (many small, few large,
    like objects at many distances), which reproduces the scale invariance of natural scenes —
    whose leaves are shaded with 1/f ("pink") noise, so surfaces have texture rather than flat
    paint, then softened by a slight lens blur."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(40, 215, 3)))
    d = ImageDraw.Draw(img)
    r_min, r_max = 2.0, size / 3
    for _ in range(int(size * size / 120)):
        # Radius by inverse transform sampling of p(r) ~ r^-3 on [r_min, r_max].
        u = rng.random()
        r = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5
        cx, cy = rng.uniform(-r, size + r, 2)
        aspect = rng.uniform(0.5, 2.0)
        d.ellipse([cx - r * aspect, cy - r / aspect, cx + r * aspect, cy + r / aspect],
                  fill=tuple(int(v) for v in rng.integers(15, 240, 3)))
    # Pink noise: white noise with its amplitude spectrum shaped to 1/f.
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / f))
    noise = (noise - noise.mean()) / noise.std()
    arr = np.asarray(img, dtype=np.float64) * (1 + 0.18 * noise)[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(radius=0.6))
