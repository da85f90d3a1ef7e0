"""The one exception type for problems the user can fix (bad input, bad config, a model or
metric that cannot be used). The CLI prints its message without a traceback."""


class DpgError(ValueError):
    pass
