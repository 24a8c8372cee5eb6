"""Bridges from other libraries' models to eurocore kernels.

Each integration is a module of its own, imported only by users of that library:

- :mod:`eurocore.integrations.transformers`: patch Hugging Face transformers' Llama and
  Mistral models (RMSNorm, rotary embeddings, attention) in place.

Layering: integrations use ``eurocore.ops`` and ``eurocore.nn`` only.
"""
