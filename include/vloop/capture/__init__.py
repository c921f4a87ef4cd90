"""Capture: what the serving gateway writes as it answers — the crash-safe spool of interactions,
reactions and photos and the shippers that move it to the lake (``spool``), and the guard that
keeps a user-supplied image URL off private and loopback addresses (``netguard``). Imports
``store`` and ``privacy``; never slows or fails a request."""
