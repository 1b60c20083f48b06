"""The primitives every decoding method shares: the decoding context, rollout, DTO, decoder,
grammar constraints, accounting, trace and streams.

Nothing here imports the strategies, the facade, the front-ends, the CLI or the bench (``tests/test_layering.py``).
"""
