"""Exception types raised by guardrail.

Every error that a user can cause derives from :class:`GuardrailError`, so the
CLI and the pipeline adapters can turn it into exit code 2 or a failed task
with the message as written. Messages name the offending value and the fix.
"""

from __future__ import annotations


class GuardrailError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class PolicyError(GuardrailError):
    """The policy file is missing, malformed, or fails validation."""


class ModelLoadError(GuardrailError):
    """A model, adapter or tokenizer could not be loaded safely."""


class ProbeSetError(GuardrailError):
    """A probe file is missing, empty, unreadable, or has no prompt column."""


class JudgeError(GuardrailError):
    """A judge could not be built or could not parse a verdict."""


class RealignmentError(GuardrailError):
    """The safety patch could not be trained (bad example, diverged loss)."""


class VerificationError(GuardrailError):
    """A patched model failed the save-and-reload identity check."""


class RegistryError(GuardrailError):
    """A registry read or write failed; the registry is left unchanged."""


class AuditError(GuardrailError):
    """An audit record is missing, malformed or inconsistent."""
