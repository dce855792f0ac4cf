"""Typed errors for bad inputs and resources: each message is one line that names the file, tensor or
option at fault and says what to change.

Every class derives from :class:`LlmquantError` and from a builtin, so existing ``except ValueError`` /
``except OSError`` code keeps working: problems with what the user passed are ``ValueError``s, problems
with the filesystem or the machine (paths, permissions, free disk, memory) are ``OSError``s. The CLI prints
any of them as ``llmquant: error: <message>`` and exits with status 2.
"""

from __future__ import annotations


class LlmquantError(Exception):
    """Base of llmquant's typed errors (always combined with ValueError or OSError)."""


# ---- inputs (ValueError) ------------------------------------------------------------------------
class ModelConfigError(LlmquantError, ValueError):
    """A model's config.json is missing a field, is not valid JSON, or describes an unsupported model."""


class WeightsError(LlmquantError, ValueError):
    """A float weight holds NaN or inf (the message names the tensor)."""


class CheckpointError(LlmquantError, ValueError):
    """A checkpoint file (safetensors shard, index, quantization_config) is corrupted or truncated; the
    message names the file and, where known, the tensor."""


class FormatError(LlmquantError, ValueError):
    """The chosen format cannot store this bits / group size / permutation combination."""


class NumericsError(LlmquantError, ValueError):
    """Calibration activations became NaN or inf (the message names the layer and the remedy)."""


class ResumeMismatchError(LlmquantError, ValueError):
    """A resume directory belongs to a different run (the message says which part differs)."""


class ResumeStateError(LlmquantError, ValueError):
    """A resume directory of this run has missing or unreadable files (the message names the file)."""


class OptionError(LlmquantError, ValueError):
    """An option value that cannot work with this model (e.g. --seqlen beyond its context)."""


# ---- filesystem and machine (OSError) -----------------------------------------------------------
class ModelNotFoundError(LlmquantError, FileNotFoundError):
    """The model (or checkpoint) path does not exist or is not a model directory."""


class PathNotReadableError(LlmquantError, PermissionError):
    """A path exists but cannot be read."""


class OutputExistsError(LlmquantError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class OutputNotWritableError(LlmquantError, PermissionError):
    """The output path cannot be created or written."""


class InsufficientDiskError(LlmquantError, OSError):
    """Not enough free disk for the output (checked before any work)."""


class InsufficientMemoryError(LlmquantError, OSError):
    """The plan's estimated peak memory is clearly over what the machine has (checked before any work)."""
