"""The model: loading a Qwen3-VL base with or without a LoRA adapter, turning an image and a
question into its inputs (``vision_inputs``), answering and scoring answers (``model``), and the
decoding policy per request (``decoding``). Imports only ``store``."""
