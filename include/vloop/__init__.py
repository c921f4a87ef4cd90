"""vloop: close the feedback loop around a deployed vision-language model.

Submodules (import what you need; nothing heavy is imported here):
``schema`` (record contracts), ``config`` (VLOOP_* settings), ``lake`` (local dir / MinIO-S3
storage), ``images`` (image intake), ``cli`` (the ``vloop`` command).
"""

__version__ = "0.1.0"
