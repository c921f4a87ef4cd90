"""The serving container: a vLLM-compatible multi-LoRA model server plus the feedback gateway
(``python -m serving`` or ``vloop serve``). See serving/app.py for the HTTP API."""
