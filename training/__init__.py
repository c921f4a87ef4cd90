"""LoRA fine-tuning of the served Qwen3-VL (``python -m training --config FILE``).

Its own container image (training/Dockerfile) runs on GPU nodes. The trainer itself lands with
the retraining issue; until then this package only reserves the import path.
"""
