"""The exception types for a run that cannot go on, and their one-line messages.

main.py catches them, prints the message as a single line and exits: status 2 for input the user
can fix (paths, files, flags, data), 1 when training diverged. A missing COCO folder or a
checkpoint that does not fit the model never ends in a long traceback.
"""


class UserInputError(Exception):
    """A problem with a path, a file, a flag or the data that the user can fix; the message says how."""

    exit_status = 2

    def one_line(self):
        """The message on one line. A DataLoader worker's error is re-raised by PyTorch with the
        worker's traceback as its message: then the original message, its last line."""
        text = str(self).strip()
        lines = text.splitlines() or [""]
        name = f"{type(self).__module__}.{type(self).__name__}: "
        if "Original Traceback" in text and lines[-1].startswith(name):
            return lines[-1][len(name):]
        return " ".join(line.strip() for line in lines)


class TrainingDiverged(UserInputError):
    """A non-finite loss, gradient or weight: the step where it happened, the loss terms and
    the last good checkpoint are in the message (the settings, typically the learning rate,
    are what to change)."""

    exit_status = 1
