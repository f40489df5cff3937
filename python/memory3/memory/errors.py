"""Errors raised by the memory bank. All are ValueErrors: they describe a bad input (a bank
that does not fit the model, a damaged file), never a bug, so the CLI prints them as one line.
"""
from __future__ import annotations


class BankError(ValueError):
    """A memory bank cannot be used as asked."""


class BankCorruptError(BankError):
    """A bank file is missing, truncated or damaged (its message names the file)."""


class BankMismatchError(BankError):
    """The bank was encoded by another model (its message names both fingerprints)."""

    def __init__(self, path, bank_fingerprint: str, model_fingerprint: str):
        self.bank_fingerprint = bank_fingerprint
        self.model_fingerprint = model_fingerprint
        super().__init__(
            f"memory bank {path} was encoded by a model with fingerprint {bank_fingerprint}, "
            f"but this model's fingerprint is {model_fingerprint}; rebuild the bank for this "
            f"model with `memory3 bank reencode {path} --model MODEL`"
        )
