"""Store: where the loop's data lives and what shape it has — the record schemas (``schema``),
the one settings object (``config``), the lake on a local directory or S3 (``lake``, with
``s3server`` for a local SeaweedFS), image bytes and their hashes (``images``), secrets on disk
(``secretfile``) and small dataframe helpers (``frames``). The floor every other stage stands on:
it imports no other stage."""
