"""Curate — the daily loop (``feedback_daily``): read the day's raw logs (``ingest``), check them
and quarantine bad rows (``quality``), mine implicit feedback and phrasings (``mining``), score
photos (``imagequality``) and answers (``grounding``; confidence in ``vlm.model``), pick what
annotators should see (``selection``), push to and pull from Label Studio (``labelstudio``),
classify errors (``errortypes``) and write the daily and loop reports (``report``). ``daily``
holds the steps the DAG wires together."""
