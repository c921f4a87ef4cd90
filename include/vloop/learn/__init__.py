"""Learn — the biweekly round (``retrain_biweekly``): build a training set from labels, replay
and the golden set (``dataset``), fine-tune a LoRA adapter (``sft``, run by ``python -m
training``), evaluate it (``evaluation``), gate it against the champion and register it
(``retrain``, ``registry``), and bootstrap a new product line before any labels exist
(``coldstart``)."""
