"""Errors raised by the registration tasks."""


class RegistrationInputError(ValueError):
    """The input cannot be registered as given; the message names the fix.

    Raised before anything is written, so the plate on disk is unchanged.
    """
