"""The one exception type for problems caused by the user's input (paths, files, flags).

main.py catches it and prints its message as a single line, then exits with status 2, so a
missing COCO folder or a checkpoint that does not fit the model never ends in a long traceback.
"""


class UserInputError(Exception):
    """A problem with a path, a file or a flag that the user can fix; the message says how."""
