"""Errors raised by the registration tasks, and those that mean bad input."""

import json

from ngio.utils import NgioFileNotFoundError, NgioValidationError


class RegistrationInputError(ValueError):
    """The input cannot be registered as given; the message names the fix.

    Raised before anything is written, so the plate on disk is unchanged.
    """


MISSING_OR_MALFORMED = (
    NgioFileNotFoundError,
    NgioValidationError,
    json.JSONDecodeError,
)
"""What reading OME-Zarr metadata raises when it is absent or invalid: ngio's
typed errors, and zarr's when a metadata file is not JSON at all. Anything else
(a ``PermissionError``, a full disk, a bug) is not about the input and passes
through unchanged."""
