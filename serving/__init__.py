"""The serving container: a vLLM-compatible model server plus the feedback gateway
(``python -m serving``). The server itself lands with the serving issue; until then this package
only reserves the import path.
"""
