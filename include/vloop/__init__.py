"""vloop: close the feedback loop around a deployed vision-language model.

The package is grouped by the loop's stages (docs/architecture.md has the map):
``store`` (schemas, settings, the lake) → ``vlm`` (the model) → ``capture`` (what serving writes)
→ ``curate`` (the daily loop) → ``learn`` (the biweekly round) → ``release`` (the canary);
``privacy`` runs across them, ``sim`` is the simulation production code never imports, and
``cli`` / ``uipage`` are the operators' command line and Airflow page. Import a stage's modules
as ``from vloop.curate import selection``; nothing heavy is imported here.
"""

__version__ = "0.1.0"
