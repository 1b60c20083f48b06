"""Rollout, DTO, decoder and accounting: the primitives every decoding method shares."""
