"""mtgr-batch: nightly batch scoring of user-behaviour logs with an MTGR (HSTU-style) model.

Entry points: ``python -m batch.run`` (the Hydra batch job) and :mod:`batch.api` (in-process scoring).
"""
