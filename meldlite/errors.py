"""Exception hierarchy: every error meldlite raises on bad input is one of these.

Each carries a one-line message naming what is wrong and where; the CLI prints
that line and exits with status 2.
"""


class MeldliteError(Exception):
    """Base class of all errors meldlite raises on purpose."""


class FormatError(MeldliteError):
    """A GGUF file is corrupt, truncated, hostile or not what it claims to be."""


class UnsupportedError(MeldliteError):
    """A well-formed input uses something meldlite does not implement
    (an architecture, a quant type, a tokenizer)."""


class OptionError(MeldliteError, ValueError):
    """An option or argument is out of range or malformed."""


class BudgetError(MeldliteError):
    """A memory budget is too small to run the model."""


class ProtocolError(MeldliteError):
    """A network message is malformed, truncated, oversized or of the wrong version."""


class PeerError(MeldliteError):
    """A peer could not be reached, timed out or refused the request."""


class TemplateError(MeldliteError):
    """A chat template is malformed, or raised an error while rendering messages."""


class ContextError(OptionError):
    """A prompt longer than the context the model was loaded with."""
