"""Adapters to other frameworks, installed as ``nabla_lc.integrations`` (DSPy: :mod:`nabla_lc.integrations.dspy`)."""
