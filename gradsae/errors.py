"""Exceptions raised by gradsae.

Every error a user can trigger with bad input is one of these (or a plain ``ValueError`` /
``TypeError`` subclass of them), with a message that names the problem and, where there is
one, the fix.
"""


class GradSAEError(Exception):
    """Base class of every gradsae error."""


class SAEFormatError(GradSAEError, ValueError):
    """An SAE file or directory cannot be read: missing file or tensor, shapes that disagree,
    unknown architecture, corrupt data, non-finite weights."""


class InputError(GradSAEError, ValueError):
    """Inputs to an op are malformed: wrong shape, dtype, device, or non-finite values."""


class CapacityError(GradSAEError, RuntimeError):
    """A threshold SAE activated more latents in one row than the capacity allows."""


class BackendError(GradSAEError, RuntimeError):
    """No backend (or not the requested one) can serve an input; the message lists why."""


class GradSAEWarning(UserWarning):
    """Something gradsae did differently from what was asked, or dropped, and says so: a
    lossy dtype cast of the inputs, donor latents skipped by a steering edit."""
