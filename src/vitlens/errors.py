"""User errors: bad input that deserves one clear line, not a traceback.

Everything vitlens raises because of what the user gave it (a file, a flag, a config key, a
device) is a :class:`VitlensError`. The command line catches exactly these (and the OS errors
of a bad path) and prints one line with exit code 2; any other exception is a bug and keeps
its traceback. Each subclass also derives from the built-in type a library caller would
expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class VitlensError(Exception):
    """Base class of every user error; the message names the problem and the fix."""


class ConfigError(VitlensError, ValueError):
    """A config file, key, flag or value that cannot make a valid run."""


class DataError(VitlensError, ValueError):
    """A dataset that is missing, unreadable or does not fit the run (classes, channels, size)."""


class CheckpointError(VitlensError, ValueError):
    """Weights that cannot be read or do not fit the model (truncated, foreign, wrong shapes)."""


class ModelError(VitlensError, ValueError):
    """An unknown model name, or arguments the architecture cannot take."""


class ResumeError(VitlensError, ValueError):
    """A ``--resume`` that would change, lose or invent a run."""


class DeviceError(VitlensError, ValueError):
    """A device that is not there (``--device cuda`` on a machine without one)."""


class TrainingError(VitlensError, FloatingPointError):
    """A run that cannot go on as configured: its loss became NaN or infinite (too high a learning
    rate, fp16 overflow, no gradient clipping)."""


class MissingFileError(VitlensError, FileNotFoundError):
    """A file or folder the user named does not exist."""
