"""The vLLM engine: MTGR as an out-of-tree vLLM model with a paged HSTU attention backend.

Modules: ``plugin`` (entry point ``register()``), ``hf_config`` (the transformers config of ``model_type: mtgr``),
``model`` (the vLLM model class), ``attention`` (the paged backend), ``compat`` (vLLM version differences) and
``engine`` (the job's :class:`Engine`). vLLM is imported only inside this package.
"""
