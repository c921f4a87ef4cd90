"""Privacy: pseudonymous user keys and PII redaction at the edge, opt-outs, tombstones and the
audit log (``records``; its names are re-exported here, as every stage uses them), and erasure
of a user's data everywhere the lake holds it, plus retention (``erasure``). ``records`` imports
nothing else of vloop, so every stage may use it."""

from vloop.privacy.records import (AUDIT, LEGACY_OPT_OUTS_KEY, OPT_OUTS, PLACEHOLDERS, TOMBSTONES,  # noqa: F401
                                   audit, audit_log, erased_request_hashes, excluded_users,
                                   is_hmac_user_key, is_user_key, read_opt_outs, read_tombstones,
                                   record_erased_requests, record_opt_out, record_tombstone, redact,
                                   remove_opt_out, request_hash, user_key)
