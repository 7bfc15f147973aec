"""The one exception type for bad user input.

Anything a user can get wrong (a path, a flag value, a model/SAE mismatch) raises `QdmError` with a
one-line message that names the problem and what to do; the CLI prints it and exits with code 2.
"""


class QdmError(Exception):
    """Bad input or an unusable configuration, reported to the user without a traceback."""
